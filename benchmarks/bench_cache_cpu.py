"""Stage 1's two backbones at the real dimensions on a CPU, one at a time: seconds per image and peak memory.

What a CPU without a GPU can measure of a LLaVA-1.5-7B + SAM ViT-H build. The models are the real
architectures with random weights in float32 (this CPU multiplies bfloat16 at ~1 GFLOP/s, float32 at
~60): LLaVA-1.5-7B built with only the decoder layers a build to layer k runs (k, and k + 1 for the warm
start: 3.8 B parameters, 15 GB), then freed, then SAM ViT-H's image encoder (0.64 B, 2.5 GB). Each runs
through the adapter the build uses (``LlavaBackbone.encode`` with the prefix shared across a query's
questions; ``SamImageEncoder.embed``) on ``--images`` synthetic images after one untimed warm-up; peak
resident memory is sampled every 50 ms. FLOPs from ``lens_cache.flops`` give the achieved FLOP/s and the
time the same work would take on an H100 at the FLOP model's rate.

The whole ``build_cache`` path with both models loaded at once is ``make bench-cache CPU=1`` (20.2 GiB at
its peak since the build stopped holding copies of the warm start and of the prefix's cache); this script
separates the two backbones' seconds and the LLaVA's own peak, one model at a time.

    python benchmarks/bench_cache_cpu.py --images 2
"""

from __future__ import annotations

import datetime
import gc
import json
import threading
import time
from typing import Annotated

import torch
import typer
from PIL import Image

from lens_cache.cli import command_app

app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


class PeakRss:
    """The process's peak resident memory (GiB), sampled every 50 ms; :meth:`reset` starts a new window."""

    def __init__(self) -> None:
        self.peak = 0.0
        threading.Thread(target=self._watch, daemon=True).start()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * 4096 / 2**30

    def reset(self) -> None:
        self.peak = self.now()

    def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)


def scenes(count: int) -> list[Image.Image]:
    """``count`` 640 x 480 images of the synthetic world's kind (content does not change the cost)."""
    return [Image.effect_noise((640, 480), 40 + 10 * i).convert("RGB") for i in range(count)]


def timed(fn, images: list[Image.Image]) -> float:
    """Mean seconds per image of ``fn(image)`` after one untimed call."""
    fn(images[0])
    started = time.perf_counter()
    for image in images:
        fn(image)
    return (time.perf_counter() - started) / len(images)


@app.command(help=__doc__.splitlines()[0])
def main(
    images: Annotated[int, typer.Option(help="timed images per model (after one warm-up)")] = 2,
    layer: Annotated[int, typer.Option(help="the cached layer (LLaVA-1.5: 14)")] = 14,
    questions: Annotated[int, typer.Option(help="questions per image (synthetic:val has ~3)")] = 3,
    sam_variant: Annotated[str, typer.Option("--sam")] = "vit_h",
    out: Annotated[str, typer.Option(help="also append the JSON line to this file")] = "",
) -> None:
    from segment_anything import sam_model_registry

    from lens_cache.backbones.geometry import sam_frame
    from lens_cache.backbones.real_configs import build_real_mllm
    from lens_cache.backbones.sam import SamImageEncoder
    from lens_cache.flops import SamEncoderShape, backbone_workload, sam_encoder_flops

    rss, pictures, cpu = PeakRss(), scenes(images), torch.device("cpu")
    row = {"bench": "cache_cpu", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "dtype": "float32", "images": images, "questions": questions}

    rss.reset()
    mllm = build_real_mllm("llava-1.5", cpu, torch.float32, (layer,), text_layers=layer + 2)
    asked = [[mllm.question_for(f"the object number {q}", False) for q in range(questions)]]
    row["mllm_s_per_image"] = round(timed(lambda image: mllm.encode([sam_frame(image).padded_image()], asked),
                                          pictures), 2)
    workload = backbone_workload(mllm, prefix_tokens=len(mllm._prefix_ids),
                                 suffix_tokens=[mllm.num_text_tokens(q) for q in asked[0]], deepest_layer=layer,
                                 sam_flops=0)
    mllm_flops = workload.vision + workload.projector + workload.build_prefix + sum(workload.build_queries)
    row["mllm_parameters_B"] = round(sum(p.numel() for p in mllm.model.parameters()) / 1e9, 2)
    row["mllm_peak_rss_GiB"] = round(rss.peak, 2)
    row["mllm_tflop_per_image"] = round(mllm_flops / 1e12, 2)
    del mllm
    gc.collect()

    rss.reset()
    torch.manual_seed(0)
    sam = SamImageEncoder(sam_model_registry[sam_variant](checkpoint=None), spec="tiny", device=cpu,
                          dtype=torch.float32)
    row["sam"] = sam_variant
    row["sam_s_per_image"] = round(timed(lambda image: sam.embed([sam_frame(image)]), pictures), 2)
    row["sam_peak_rss_GiB"] = round(rss.peak, 2)
    sam_flops = sam_encoder_flops(SamEncoderShape.of(sam.sam.image_encoder))
    row["sam_tflop_per_image"] = round(sam_flops / 1e12, 2)
    row["achieved_gflops"] = round((mllm_flops + sam_flops) / (row["mllm_s_per_image"] + row["sam_s_per_image"]) / 1e9, 1)
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as file:
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app()
