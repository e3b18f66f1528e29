"""Stage-2 training step at the real dimensions, random weights.

LENS head (d=4096, 32 heads, MLP 11008, two layers) + descriptor + SAM ViT-H's prompt encoder
and mask decoder, AdamW, in the preset's precision and clipping as lens-train runs them (``official``:
the authors' pure bf16 without clipping; ``official-fp32master``: bf16 autocast over fp32 master weights),
batch B of cached-feature-shaped inputs (the pre-image prefix when the preset's head reads it, 576 image
tokens, L_t text tokens, 256x64x64 SAM embedding, masks at 480x640).
Reports peak GPU memory, step time and samples/s as JSON. Runs on CPU too (slowly) for a check.

    python benchmarks/bench_train_step.py --preset official --batch-size 2 --steps 20
"""

from __future__ import annotations

import json
import platform
import resource
import time
from typing import Annotated

import torch
import typer

from lens_cache.cli import command_app
from lens_core import build_lens
from lens_train.training.presets import load_preset
from lens_train.training.memory import LLAVA_PREFIX_TOKENS, StepShape, synthetic_batch
from lens_train.training.trainer import (cast_for_training, effective_precision, forward_backward, gradient_norm,
                                        parameter_dtype, train_autocast)



def build_sam_decoder_only(variant: str):
    """SAM's prompt encoder and mask decoder (identical across vit_h/l/b), random weights, without its image
    encoder: stage 2 reads that encoder's output from the cache."""
    from segment_anything import sam_model_registry

    sam = sam_model_registry[variant](checkpoint=None)
    del sam.image_encoder
    return sam


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.splitlines()[0])
def main(
    preset_name: Annotated[str, typer.Option("--preset")] = "official",
    batch_size: Annotated[int, typer.Option()] = 2,
    text_len: Annotated[int, typer.Option()] = 40,
    steps: Annotated[int, typer.Option()] = 20,
    warmup: Annotated[int, typer.Option()] = 3,
    sam_variant: Annotated[str, typer.Option("--sam")] = "vit_h",
    orig_size: Annotated[str, typer.Option()] = "480,640",
    prefix_len: Annotated[int, typer.Option(help="tokens before the image (read when the preset's head_input is full_sequence)")] = LLAVA_PREFIX_TOKENS,
) -> None:
    """Time the training step; prints one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = load_preset(preset_name)
    torch.manual_seed(0)
    sam = build_sam_decoder_only(sam_variant)
    lens = cast_for_training(build_lens(preset.model, sam).to(device), preset.train.precision)
    params = lens.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=preset.train.lr, betas=preset.train.betas, weight_decay=preset.train.weight_decay)
    n_params = sum(q.numel() for q in params)

    h, w = (int(v) for v in orig_size.split(","))
    shape = StepShape(batch_size=batch_size, text_len=text_len, prefix_len=prefix_len, original_size=(h, w))
    # cached features arrive as float16 from the store, in the dtype the trainer hands them to the model
    batch = synthetic_batch(shape, hidden_size=preset.model.hidden_size, sam_channels=preset.model.prompt_dim,
                            dtype=parameter_dtype(preset.train.precision), device=device)

    def step() -> float:  # the trainer's step (the one make bench-train-memory counts)
        losses = forward_backward(lens, batch, preset.train, train_autocast(device, preset.train.precision))
        gradient_norm(params, preset.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses["loss"].item()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    result = {
        "bench": "train_step",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": preset_name,
        "batch_size": batch_size,
        "text_len": text_len,
        "trainable_params_M": round(n_params / 1e6, 1),
        "precision": effective_precision(device, preset.train.precision),
        "grad_clip": preset.train.grad_clip,
        "step_time_s": round(dt, 4),
        "samples_per_s": round(batch_size / dt, 2),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "max_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app()
