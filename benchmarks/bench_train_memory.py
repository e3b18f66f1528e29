"""Peak memory of a stage-2 training step at the real dimensions, counted on the CPU (no GPU needed).

For each preset and batch size: the trainer's step (forward, L_seg + L_attn, backward, clipping as
the preset says, AdamW) on cache-shaped random inputs, with SAM ViT-H's prompt encoder and mask
decoder, random weights; the bytes of the tensors alive at the peak, by kind, counted by
``lens_train.training.memory`` with the matrix products skipped (zeros of the right shapes: this
CPU multiplies bfloat16 at about 1 GFLOP/s). Prints one JSON line per row, then BENCHMARKS.md's
table lines and which GPUs each batch size fits (tensor peak + 1 GiB allowance for the CUDA context).

    python benchmarks/bench_train_memory.py --preset official --preset official-fp32master --batch-sizes 1,2,8
"""

from __future__ import annotations

import datetime
import json
import platform
import resource
import time
from typing import Annotated

import torch
import typer

from bench_train_step import build_sam_decoder_only  # benchmarks/ is the script's folder
from lens_cache.cli import command_app
from lens_core import build_lens
from lens_train.training.memory import CUDA_OVERHEAD_BYTES, StepShape, measure_step_memory
from lens_train.training.presets import load_preset
from lens_train.training.trainer import cast_for_training

#: GPU memory sizes the table answers for (GB as sold: 10^9 bytes).
GPU_SIZES_GB = (10, 24, 40, 80)

app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.splitlines()[0])
def main(
    presets: Annotated[list[str], typer.Option("--preset")] = ["official", "official-fp32master"],  # noqa: B006
    batch_sizes: Annotated[str, typer.Option(help="comma-separated")] = "1,2,8",
    text_len: Annotated[int, typer.Option()] = 40,
    sam_variant: Annotated[str, typer.Option("--sam")] = "vit_h",
    skip_compute: Annotated[bool, typer.Option(help="skip the products (zeros of the right shapes)")] = True,
    out: Annotated[str, typer.Option(help="also append the JSON lines to this file")] = "",
) -> None:
    rows = []
    for name in presets:
        preset = load_preset(name)
        for batch in (int(b) for b in batch_sizes.split(",")):
            started = time.perf_counter()
            torch.manual_seed(0)
            model = cast_for_training(build_lens(preset.model, build_sam_decoder_only(sam_variant)),
                                      preset.train.precision)
            estimate = measure_step_memory(preset, model, StepShape(batch_size=batch, text_len=text_len),
                                           skip_compute=skip_compute)
            row = {"bench": "train_memory", "date": datetime.date.today().isoformat(),
                   "machine": f"{platform.machine()} CPU x{torch.get_num_threads()}", "torch": torch.__version__,
                   "preset": name, "precision": estimate.precision, "batch_size": batch, "sam": sam_variant,
                   "trainable_params_M": round(estimate.trainable_parameters / 1e6, 1),
                   "peak_GiB": round(estimate.peak_bytes / 2**30, 2),
                   **{f"{kind}_GiB": round(value / 2**30, 2) for kind, value in estimate.by_kind.items()},
                   "fits_GB": [size for size in GPU_SIZES_GB if estimate.fits(size * 1e9)],
                   "skip_compute": skip_compute, "seconds": round(time.perf_counter() - started, 1),
                   "max_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
            print(json.dumps(row), flush=True)
            if out:
                with open(out, "a") as file:
                    file.write(json.dumps(row) + "\n")
            rows.append(row)
    print(f"\n| preset | precision | batch | parameters | gradients | AdamW state | batch, activations, temporaries | peak | fits "
          f"(+{CUDA_OVERHEAD_BYTES / 2**30:.0f} GiB CUDA allowance) |")
    for row in rows:
        fits = ", ".join(f"{size} GB" for size in row["fits_GB"]) or f"none of {GPU_SIZES_GB}"
        print(f"| {row['preset']} | {row['precision']} | {row['batch_size']} | {row['parameters_GiB']} GiB | "
              f"{row['gradients_GiB']} GiB | {row['optimizer_GiB']} GiB | {row['activations_GiB']} GiB | "
              f"**{row['peak_GiB']} GiB** | {fits} |")


if __name__ == "__main__":
    app()
