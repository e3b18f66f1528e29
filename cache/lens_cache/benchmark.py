"""The stage-1 cache-build benchmark behind ``benchmarks/bench_cache.py`` (``make bench-cache``).

:func:`run_benchmark` measures, on one device:

- **the build**: the real :func:`lens_cache.build.build_cache` (prefix-shared KV cache, early stop after
  the deepest cached layer, SAM once per image, Zarr writes) over the first ``images`` images of a
  manifest into a temporary store, after an untimed warm-up build -> images/s and queries/s;
- **the store**: bytes on disk per image (image-level arrays) and per query (text states), per array;
- **a naive baseline** (:func:`naive_baseline`): per query, one full forward of all decoder layers over
  image + prompt and SAM's image encoder again -> queries/s;
- **the FLOP ceiling**: the same work counted by :mod:`lens_cache.flops`, divided by the device's peak
  (a datasheet figure on a GPU, a measured fp32 matmul rate on the CPU) -> the images/s no implementation
  can beat, and the build's achieved fraction of peak (MFU).

``scale="real"`` builds the MLLM of :data:`lens_cache.backbones.real_configs.REAL_BACKBONES` and SAM
(ViT-H by default) with random weights, in bf16, directly on the GPU; ``scale="tiny"`` runs the same code
path with the backbone's tiny counterpart and the tiny SAM on the CPU (a smoke check). Progress goes to
stderr; the result is one JSON-able dict.
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbones.real_configs import REAL_BACKBONES, build_real_mllm
from .flops import SamEncoderShape, Workload, backbone_workload, gpu_peak_flops, sam_encoder_flops


@dataclass(frozen=True)
class BenchRequest:
    """What to benchmark (``benchmarks/bench_cache.py``'s options, with the same defaults).

    ``layers`` None: the backbone's benchmark layer (``REAL_BACKBONES[backbone].layer``);
    ``baseline_queries`` None: 8 at real scale, 2 at tiny; ``device`` None: cuda for real, cpu for tiny;
    ``peak_tflops`` overrides the device's peak; ``threads``: CPU threads (default: half the cores);
    ``dtype`` None: bfloat16 at real scale, float32 at tiny; ``truncate``: build only the decoder layers the
    build runs (to the deepest cached layer, and the next one for the warm start), so that a float32 real-scale
    model fits a CPU's memory; the naive baseline, which needs them all, is then not run.
    """

    scale: str = "real"
    images: int = 32
    split: str = "synthetic:val"
    data_root: str | None = None
    backbone: str = "llava-1.5"
    layers: Sequence[int] | None = None
    batch_size: int = 4
    warmup_images: int = 2
    baseline_queries: int | None = None
    sam: str = "vit_h"
    device: str | None = None
    peak_tflops: float | None = None
    threads: int | None = None
    dtype: str | None = None
    truncate: bool = False


@dataclass
class _Run:
    """A request resolved against the machine, and what its timed part measured."""

    device: torch.device
    dtype: torch.dtype
    layers: tuple[int, ...]
    baseline_queries: int
    manifest: Any = None
    extractor: Any = None
    setup_s: float = 0.0
    build_s: float = 0.0
    num_images: int = 0
    num_queries: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    peak_mem: float | None = None
    naive: dict[str, Any] = field(default_factory=dict)
    components_s: dict[str, float] = field(default_factory=dict)
    peak: float | None = None
    peak_source: str = ""


def say(text: str) -> None:
    print(f"[bench-cache] {text}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cpu_matmul_flops(seconds: float = 0.5, size: int = 1024) -> float:
    """fp32 matmul FLOP/s of this CPU (the tiny scale's stand-in for a datasheet peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


def store_bytes(store: Any) -> dict[str, int]:
    """Bytes on disk per array of a finished store."""
    return {name: int(store.location.bytes_under(name)) for name in store.array_names()}


# ----------------------------------------------------------------------------- extractors


def build_real_extractor(
    device: torch.device, dtype: torch.dtype, layers: Sequence[int], sam_variant: str, backbone: str = "llava-1.5",
    text_layers: int | None = None,
) -> Any:
    """``backbone`` (LLaVA-1.5-7B by default) + SAM ``sam_variant`` with random weights, created directly on
    ``device`` in ``dtype`` (``text_layers``: :func:`~.backbones.real_configs.build_real_mllm`'s)."""
    from segment_anything import sam_model_registry

    from .backbones.extractor import LensFeatureExtractor

    mllm = build_real_mllm(backbone, device, dtype, layers, text_layers)
    with torch.device(device):
        sam = sam_model_registry[sam_variant](checkpoint=None)
    return LensFeatureExtractor(mllm=mllm, sam=_random_sam_encoder(sam, sam_variant, device, dtype))


def _random_sam_encoder(sam: Any, variant: str, device: torch.device, dtype: torch.dtype) -> Any:
    """SamImageEncoder around random weights (there is no checkpoint file to hash for the identity)."""
    from .backbones.runtime import dtype_name
    from .backbones.sam import SamImageEncoder

    encoder = SamImageEncoder(sam, spec="tiny", device=device, dtype=dtype)  # "tiny" only to skip the file hash
    encoder.spec = f"{variant}:random"
    encoder.identity = {"variant": variant, "weights": "random-seed0", "compute_dtype": dtype_name(dtype)}
    return encoder


def build_tiny_extractor(device: torch.device, dtype: torch.dtype, layers: Sequence[int], backbone: str = "llava-1.5") -> Any:
    """The tiny counterpart of ``backbone`` (``tiny``, ``tiny-qwen2vl``, ``tiny-onevision``) + the tiny SAM."""
    from .backbones import build_extractor

    return build_extractor(mllm=REAL_BACKBONES[backbone].tiny, sam="tiny", layers=layers, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- measurements


def naive_baseline(extractor: Any, manifest: Any, queries: int, layers: Sequence[int], device: torch.device) -> dict[str, Any]:
    """Per query: processor -> full forward of every decoder layer (hidden states of all), SAM again.

    The layer-``k`` states of the image and text tokens are copied to the CPU as the build does.
    Returns seconds per query (after one warm-up query) and how many were timed.
    """
    from .backbones.geometry import sam_frame
    from .block_job import load_image

    mllm, sam = extractor.mllm, extractor.sam
    rows = list(range(min(queries + 1, manifest.num_rows)))
    if len(rows) < 2:
        raise ValueError("the naive baseline needs at least 2 queries (one warm-up)")
    paths = manifest.column("image_path").to_pylist()
    heights, widths = manifest.column("height").to_pylist(), manifest.column("width").to_pylist()
    texts, sentences = manifest.column("text").to_pylist(), manifest.column("is_sentence").to_pylist()
    images = {}
    for r in rows:  # decoded beforehand: the build decodes in threads, off the critical path
        if paths[r] not in images:
            loaded = load_image(paths[r], (heights[r], widths[r]))
            if loaded.image is None:
                raise RuntimeError(f"naive baseline: {loaded.message}")
            images[paths[r]] = loaded.image

    def one(r: int) -> None:
        frame = sam_frame(images[paths[r]])
        prompt = mllm.prompt_for(mllm.question_for(texts[r], bool(sentences[r])))
        image = frame.padded_image()
        if hasattr(mllm, "model_image"):  # LLaVA-OneVision: SAM's square at 378 px in a 384 px crop
            image = mllm.model_image(image)
        inputs = mllm.processor(text=prompt, images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(mllm.dtype)
        with torch.inference_mode():
            out = mllm.model.model(**inputs, output_hidden_states=True, use_cache=False)
            is_image = inputs["input_ids"][0] == mllm.image_token_id
            last_image = int(is_image.nonzero().max())
            for k in layers:
                states = out.hidden_states[k][0]
                states[is_image].float().cpu()
                states[last_image + 1 :].float().cpu()
        sam.embed([frame])

    one(rows[0])
    synchronize(device)
    start = time.perf_counter()
    for r in rows[1:]:
        one(r)
    synchronize(device)
    return {"queries": len(rows) - 1, "seconds": time.perf_counter() - start}


def _resolve(request: BenchRequest) -> _Run:
    """The device, dtype, layers and baseline size of ``request``; SystemExit when it cannot run here."""
    if request.images < 1:
        raise SystemExit("--images must be >= 1")
    if request.backbone not in REAL_BACKBONES:
        raise SystemExit(f"--backbone must be one of {', '.join(REAL_BACKBONES)}, got {request.backbone!r}")
    layers = tuple(sorted(set(request.layers or (REAL_BACKBONES[request.backbone].layer,))))
    device = torch.device(request.device or ("cuda" if request.scale == "real" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--scale real needs a CUDA GPU ({request.backbone} at its real size + SAM ViT-H in bf16); "
            "run --scale tiny for a CPU smoke check, or pass --device cpu to insist"
        )
    if request.dtype not in (None, "bfloat16", "float32"):
        raise SystemExit(f"--dtype must be bfloat16 or float32, got {request.dtype!r}")
    dtype = getattr(torch, request.dtype or ("bfloat16" if request.scale == "real" else "float32"))
    baseline_queries = request.baseline_queries
    if baseline_queries is None:
        baseline_queries = 0 if request.truncate else 8 if request.scale == "real" else 2
    if request.truncate and baseline_queries:
        raise SystemExit("--truncate builds only the layers the build runs: the naive baseline needs them all "
                         "(pass --baseline-queries 0)")
    return _Run(device=device, dtype=dtype, layers=layers, baseline_queries=baseline_queries)


def _measure(request: BenchRequest, run: _Run) -> None:
    """The timed part: build the backbones, a warm-up build, the measured build, the naive baseline, the peak.

    Fills ``run``'s measurements; the stores live in a temporary folder removed at the end.
    """
    from lens_manifests import build_manifest

    from .backbones.runtime import cpu_threads
    from .build import build_cache, first_images

    device, images = run.device, request.images
    with cpu_threads(request.threads, device), tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        manifest_all = build_manifest(request.split, request.data_root)
        run.manifest = manifest = first_images(manifest_all, images)
        warm = first_images(manifest_all, max(1, min(request.warmup_images, images)))

        say(f"building the {request.scale} backbones on {device} ({str(run.dtype).removeprefix('torch.')})")
        started = time.perf_counter()
        if request.scale == "real":
            text_layers = run.layers[-1] + 2 if request.truncate else None
            run.extractor = build_real_extractor(device, run.dtype, run.layers, request.sam, request.backbone,
                                                 text_layers)
        else:
            run.extractor = build_tiny_extractor(device, run.dtype, run.layers, request.backbone)
        synchronize(device)
        run.setup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def build(table: Any, name: str) -> tuple[Any, float]:
            synchronize(device)
            t0 = time.perf_counter()
            store = build_cache(table, Path(tmp) / name, lambda: run.extractor, spec=request.split,
                                batch_size=request.batch_size, progress=True)
            synchronize(device)
            return store, time.perf_counter() - t0

        if request.warmup_images > 0:
            say(f"warm-up build: {warm.num_rows} queries of {min(request.warmup_images, images)} image(s)")
            build(warm, "warmup")
        say(f"measured build: {images} image(s), {manifest.num_rows} queries")
        with _timed(run.extractor.mllm, "encode", run.components_s, device), \
                _timed(run.extractor.sam, "embed", run.components_s, device):
            store, run.build_s = build(manifest, "store")
        run.peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        run.num_images, run.num_queries = store.num_images, store.num_queries
        run.sizes = store_bytes(store)

        if run.baseline_queries:
            say(f"naive baseline: {run.baseline_queries} queries, full forward + SAM each")
            run.naive = naive_baseline(run.extractor, manifest, run.baseline_queries, run.layers, device)
        run.peak, run.peak_source = _device_peak(request, device)  # on the CPU: with the build's thread count


@contextlib.contextmanager
def _timed(owner: Any, method: str, seconds: dict[str, float], device: torch.device):
    """While active, the seconds spent in ``owner.method`` add up in ``seconds[type(owner).__name__]``."""
    original = getattr(owner, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        synchronize(device)
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize(device)
            key = type(owner).__name__
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started

    setattr(owner, method, timed)
    try:
        yield
    finally:
        delattr(owner, method)


def _device_peak(request: BenchRequest, device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from): ``--peak-tflops``, the GPU's datasheet, or a measured CPU matmul."""
    if request.peak_tflops is not None:
        return request.peak_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        peak, key = gpu_peak_flops(torch.cuda.get_device_name(device))
        return peak, f"datasheet dense bf16 ({key})" if peak else "unknown GPU: pass --peak-tflops"
    return measure_cpu_matmul_flops(), "measured fp32 1024^3 matmul on this CPU"


def _workload(run: _Run) -> tuple[Workload, list[int]]:
    """The FLOPs of the measured work (:mod:`lens_cache.flops`) and each query's suffix length in tokens."""
    mllm, manifest = run.extractor.mllm, run.manifest
    questions = [
        mllm.question_for(t, bool(s))
        for t, s in zip(manifest.column("text").to_pylist(), manifest.column("is_sentence").to_pylist(), strict=True)
    ]
    suffix = [mllm.num_text_tokens(q) for q in questions]
    workload = backbone_workload(
        mllm,
        prefix_tokens=len(mllm._prefix_ids),
        suffix_tokens=suffix,
        deepest_layer=run.layers[-1],
        sam_flops=sam_encoder_flops(SamEncoderShape.of(run.extractor.sam.sam.image_encoder)),
    )
    return workload, suffix


# ----------------------------------------------------------------------------- the result


def run_benchmark(request: BenchRequest) -> dict[str, Any]:
    """Run the benchmark of ``request``; progress to stderr; returns the JSON-able result.

    Raises SystemExit (with the reason) when ``request`` cannot run on this machine (no CUDA GPU at real
    scale, ``images`` < 1, an unknown backbone).
    """
    run = _resolve(request)
    _measure(request, run)
    workload, suffix = _workload(run)
    build_flops = run.num_images * workload.build_per_image + sum(workload.build_queries)
    naive_flops_per_query = sum(workload.naive_queries) / len(workload.naive_queries)
    build_ips, build_qps = run.num_images / run.build_s, run.num_queries / run.build_s
    naive_qps = run.naive["queries"] / run.naive["seconds"] if run.naive else None
    image_bytes = sum(v for k, v in run.sizes.items() if k.startswith("images/"))
    query_bytes = sum(v for k, v in run.sizes.items() if k.startswith("queries/"))
    result = _describe(request, run, workload, suffix)
    result.update(_throughput(run, build_ips, build_qps, naive_qps, image_bytes, query_bytes))
    result.update(_flop_fields(run, workload, build_flops, naive_flops_per_query if run.naive else None))
    if run.peak:
        result["ceiling_images_per_s"] = round(run.peak * run.num_images / build_flops, 3)
        result["ceiling_queries_per_s"] = round(run.peak * run.num_queries / build_flops, 3)
        result["build_mfu"] = round(build_flops / run.build_s / run.peak, 4)
        if naive_qps is not None:
            result["naive_ceiling_queries_per_s"] = round(run.peak / naive_flops_per_query, 3)
            result["naive_mfu"] = round(naive_flops_per_query * naive_qps / run.peak, 4)
    say(
        f"build {build_ips:.3f} img/s, {build_qps:.3f} q/s"
        + (f"; naive {naive_qps:.3f} q/s ({build_qps / naive_qps:.1f}x)" if naive_qps else "")
        + f"; {image_bytes / run.num_images / 2**20:.2f} MiB/image, {query_bytes / run.num_queries / 2**10:.1f} KiB/query"
        + (f"; ceiling {result['ceiling_images_per_s']:.2f} img/s, MFU {result['build_mfu']:.1%}" if run.peak else "")
    )
    return result


def _describe(request: BenchRequest, run: _Run, workload: Workload, suffix: list[int]) -> dict[str, Any]:
    """The result's first fields: what ran, where, on what."""
    mllm, device = run.extractor.mllm, run.device
    text = mllm.model.config.text_config
    return {
        "bench": "cache_build",
        "date": datetime.date.today().isoformat(),
        "scale": request.scale,
        "backbone": request.backbone,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "dtype": str(run.dtype).removeprefix("torch."),
        "mllm": f"{mllm.name_or_path} (d={text.hidden_size}, {text.num_hidden_layers} layers, "
        f"attn {mllm.model.config._attn_implementation})",
        "sam": run.extractor.sam.identity["variant"],
        "layers": list(run.layers),
        "split": request.split,
        "batch_size": request.batch_size,
        "images": run.num_images,
        "queries": run.num_queries,
        "prefix_tokens": workload.prefix_tokens,
        "mean_suffix_tokens": round(sum(suffix) / len(suffix), 2),
    }


def _throughput(
    run: _Run, build_ips: float, build_qps: float, naive_qps: float | None, image_bytes: int, query_bytes: int
) -> dict[str, Any]:
    """The result's timings, rates and bytes (the naive baseline's None when it did not run)."""
    import resource

    naive = run.naive
    return {
        "setup_s": round(run.setup_s, 2),
        "build_s": round(run.build_s, 3),
        "build_images_per_s": round(build_ips, 4),
        "build_queries_per_s": round(build_qps, 4),
        "seconds_per_image": {name: round(seconds / run.num_images, 3) for name, seconds in run.components_s.items()},
        "naive_queries_timed": naive.get("queries"),
        "naive_s_per_query": round(naive["seconds"] / naive["queries"], 4) if naive else None,
        "naive_queries_per_s": round(naive_qps, 4) if naive_qps else None,
        "naive_images_per_s": round(naive_qps / (run.num_queries / run.num_images), 4) if naive_qps else None,
        "speedup_queries_per_s": round(build_qps / naive_qps, 2) if naive_qps else None,
        "bytes_per_image": round(image_bytes / run.num_images),
        "bytes_per_query": round(query_bytes / run.num_queries),
        "bytes_by_array": run.sizes,
        "max_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def _flop_fields(run: _Run, workload: Workload, build_flops: int, naive_flops_per_query: float | None) -> dict[str, Any]:
    """The result's FLOP counts, the peak they are divided by and the peak memory."""
    return {
        "flops_per_image": {
            "vision_tower": workload.vision,
            "projector": workload.projector,
            f"llm_prefix_to_layer_{run.layers[-1]}": workload.build_prefix,
            "sam_image_encoder": workload.sam,
            "total": workload.build_per_image,
        },
        "flops_per_query_mean": round(sum(workload.build_queries) / run.num_queries),
        "flops_build_total": build_flops,
        "flops_naive_per_query_mean": round(naive_flops_per_query) if naive_flops_per_query else None,
        "peak_flops": run.peak,
        "peak_source": run.peak_source,
        "peak_memory_GiB": round(run.peak_mem, 2) if run.peak_mem is not None else None,
    }
