"""Stage-1 cache build at the real dimensions (an MLLM + SAM ViT-H, random weights, bf16) vs a naive baseline.

What it measures, on one device (the harness is :mod:`lens_cache.benchmark`, the FLOP model
:mod:`lens_cache.flops`, the real-size models :mod:`lens_cache.backbones.real_configs`):

- **the build**: the real ``lens_cache.build.build_cache`` (prefix-shared KV cache, early stop
  after the deepest cached layer, SAM once per image, Zarr writes) over the first ``--images``
  images of a synthetic manifest into a temporary store -> images/s and queries/s;
- **the store**: bytes on disk per image (image-level arrays: layer states + SAM embedding) and
  per query (text states), split by array;
- **a naive baseline**: per query, one full forward of all decoder layers over image + prompt
  (``output_hidden_states``, no KV-cache sharing, no early stop, no logits) and SAM's image
  encoder run again -> queries/s on ``--baseline-queries`` queries;
- **the FLOP ceiling**: FLOPs of the same work counted from the architecture (matmuls and
  convolutions, 2 FLOPs per multiply-add; causal attention counted as the pairs it needs),
  divided by the device's peak dense bf16 FLOP/s -> the images/s no implementation can beat,
  and the build's achieved fraction of peak (MFU).

``--backbone`` picks the MLLM: ``llava-1.5`` (default: LLaVA-1.5-7B, CLIP ViT-L/14-336 + Vicuna-7B),
``qwen2vl-2b`` (Qwen2-VL-2B-Instruct at 672 px, 24 x 24 tokens) or ``onevision-7b`` (LLaVA-OneVision-7B,
SigLIP-384 + Qwen2-7B, base resolution only: 27 x 27 = 729 image tokens, the base grid alone as the authors feed it).
``--scale real`` (default) needs a CUDA GPU: the MLLM and SAM ViT-H are built in code with random
weights, directly in bf16 on the GPU (configs from memory of the public config.json files).
``--scale tiny`` runs the same code path with the backbone's tiny counterpart (``tiny``,
``tiny-qwen2vl``, ``tiny-onevision``) on the CPU in well under a minute (a smoke check; the CPU "peak"
is then a measured fp32 matmul rate, not a datasheet figure).

    python benchmarks/bench_cache.py --scale real --images 32 --backbone onevision-7b
    python benchmarks/bench_cache.py --scale tiny --images 2 --backbone qwen2vl-2b

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from lens_cache.backbones.real_configs import REAL_BACKBONES
from lens_cache.benchmark import BenchRequest, run_benchmark
from lens_cache.cli import command_app


class Scale(str, Enum):
    """``--scale``: the real dimensions on a GPU, or the tiny counterparts on the CPU."""

    real = "real"
    tiny = "tiny"


#: ``--backbone``: the names of :data:`lens_cache.backbones.real_configs.REAL_BACKBONES`.
Backbone = Enum("Backbone", {name: name for name in REAL_BACKBONES}, type=str)


class SamVariant(str, Enum):
    """``--sam``: the SAM image encoder built at real scale."""

    vit_h = "vit_h"
    vit_l = "vit_l"
    vit_b = "vit_b"


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.splitlines()[0])
def bench(
    scale: Annotated[Scale, typer.Option()] = Scale.real,
    images: Annotated[int, typer.Option(help="images of the manifest to cache (the measured build)")] = 32,
    split: Annotated[str, typer.Option(help="manifest spec (synthetic data is generated if absent)")] = "synthetic:val",
    data_root: Annotated[str | None, typer.Option(help="folder of the data (default: generated synthetic set)")] = None,
    backbone: Annotated[Backbone, typer.Option(
        help="MLLM: llava-1.5 (LLaVA-1.5-7B), qwen2vl-2b (Qwen2-VL-2B), onevision-7b (LLaVA-OneVision-7B); "
             "--scale tiny uses its tiny counterpart (tiny, tiny-qwen2vl, tiny-onevision)")] = Backbone["llava-1.5"],
    layers: Annotated[str | None, typer.Option(
        help="cached layers, comma-separated [llava-1.5: 14; qwen2vl-2b, onevision-7b: 20]")] = None,
    batch_size: Annotated[int, typer.Option(help="images per extract call (build_cache's default)")] = 4,
    warmup_images: Annotated[int, typer.Option(help="images of an untimed build first (kernels, allocator)")] = 2,
    baseline_queries: Annotated[int | None, typer.Option(help="timed naive queries [real: 8, tiny: 2]")] = None,
    sam: Annotated[SamVariant, typer.Option(help="SAM variant (real scale)")] = SamVariant.vit_h,
    device: Annotated[str | None, typer.Option(help="default: cuda for real, cpu for tiny")] = None,
    peak_tflops: Annotated[float | None, typer.Option(help="peak dense FLOP/s of the device, in TFLOP/s")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads when --device cpu (default: half the cores)")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 or float32 [real: bfloat16, tiny: float32]")] = None,
    truncate: Annotated[bool, typer.Option(
        help="build only the decoder layers the build runs (a float32 real-scale model in a CPU's memory); "
             "needs --baseline-queries 0")] = False,
    out: Annotated[str | None, typer.Option(help="also write the JSON object to this file")] = None,
) -> dict[str, Any]:
    """Run the benchmark; prints progress to stderr and the JSON object to stdout, and returns it."""
    request = BenchRequest(
        scale=scale.value, images=images, split=split, data_root=data_root, backbone=backbone.value,
        layers=[int(v) for v in layers.split(",")] if layers else None, batch_size=batch_size,
        warmup_images=warmup_images, baseline_queries=baseline_queries, sam=sam.value, device=device,
        peak_tflops=peak_tflops, threads=threads, dtype=dtype, truncate=truncate,
    )  # fmt: skip
    result = run_benchmark(request)
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        Path(out).write_text(line + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark on the command line ``argv`` (default: ``sys.argv[1:]``) and return its JSON object.

    Unlike ``app()`` (the script's entry point), a bad command line raises Click's ``UsageError``
    rather than printing it and exiting 2.
    """
    return app(args=list(argv) if argv is not None else None, standalone_mode=False)


if __name__ == "__main__":
    app()
