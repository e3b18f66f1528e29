"""``lens-cache estimate``: what a build (and the training after it) takes, before running it.

For each split (``--split``, comma-separated for several stores), :func:`estimate` gives

- **images and queries**: counted from the split's manifest (:func:`lens_manifests.build_manifest`) when
  ``--data-root`` holds its data (synthetic specs always), else the published figures
  (:mod:`lens_manifests.published_counts`); each count says which;
- **store bytes**, from the store format itself: the arrays a store of these sizes holds
  (:func:`lens_cache.store_format.store_arrays` for attributes made up from the sizes), float16 features at
  the MLLM's real dimensions (:mod:`lens_cache.estimate_inputs`), plus what a store keeps once: the prefix
  states, the warm-start decoder layers (in the build's compute dtype: bfloat16 on CUDA, float32 on the CPU),
  the manifest file and the Zarr metadata. The compression ratio: ``none`` 1 (exact); ``lossless`` (zstd) 1,
  an **upper bound** (zstd saves ~8% on real float16 activations and ~18% on the tiny SAM's embeddings, by no
  rule); ``bitround`` 13/16 (7 of float16's 10 mantissa bits kept: approximate). The text states are
  right-padded to the longest question: with ``none`` the padding is stored, with zstd the zero rows compress
  away, so the bytes follow each query's own L_t;
- **free disk**: the store at ratio 1 plus a filesystem block (4 KiB) per chunk file. Nothing in the writer
  checks free disk (no ``disk_usage``/``statvfs`` anywhere): a disk that fills stops the build with one line
  (:func:`lens_cache.errors.output_error`) and a rerun resumes; this is the room to leave. The writer writes
  each chunk in place and the warm-start file under a temporary name renamed into place (never two copies);
  the manifest's Parquet bytes are made in the system's temporary folder;
- **build GPU-hours**: the FLOP model of the build (:mod:`lens_cache.flops`: per image the vision tower,
  projector, the prefix to the deepest cached layer and SAM's encoder; per query every cached question
  against the prefix) over the GPU's dense bf16 peak (:data:`lens_cache.flops.PEAK_BF16_DENSE`), at MFU 1
  (the ceiling) and at ``--mfu`` (assumed): computed, not measured;
- **stage-2 hours** of the preset's schedule (steps x batch x grad_accum samples) at a projected rate:
  BENCHMARKS.md has no measured stage-2 GPU figure (its GPU rows are unmeasured), so the rate is the FLOP
  model's: 3 x the forward of the head's two decoder layers over the sequence the preset's head reads
  (prefix with ``full_sequence``, image tokens, a training question), at the same peak and MFU (descriptor,
  SAM's decoder and the optimizer left out: each small next to them); ``--train-samples-per-s`` gives a
  measured rate instead. The preset is read as data (its JSON file): stage 1 imports nothing of stage 2.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lens_cache.errors import UsageError
from lens_cache.estimate_inputs import (
    ASSUMED_WORDS,
    DTYPE_BYTES,
    MllmShape,
    SamShape,
    TextProfile,
    text_profile,
    typical_profile,
)

#: Compression ratio of the float16 feature arrays per ``--compression``, and what the figure is.
COMPRESSION_RATIOS = {"none": (1.0, "exact"), "lossless": (1.0, "upper bound"), "bitround": (13 / 16, "approximate"),
                      # int8: 1 byte per value + a 2-byte scale per row of 4096 (d of LLaVA-1.5-7B, SAM's 64 x 64 map)
                      # before zstd: lens_cache.store_codec; 0.445 measured after zstd by benchmarks/bench_codec.py
                      "int8": (0.5 + 1 / 4096, "upper bound")}
#: ``--gpu`` -> the key of :data:`lens_cache.flops.PEAK_BF16_DENSE`.
GPUS = {"h100": "H100 SXM", "h100-pcie": "H100 PCIe", "h100-nvl": "H100 NVL", "h200": "H200", "a100": "A100",
        "l40s": "L40S", "a10g": "A10G", "l4": "L4"}
#: Filesystem block: a chunk file takes up to one more on disk than its bytes.
FS_BLOCK = 4096
#: Zarr metadata (``zarr.json``): about this much per array, per group and for the root with the attributes.
META_PER_ARRAY, META_PER_GROUP, META_ROOT = 640, 70, 6000
#: Manifest Parquet bytes per query where no manifest is at hand (the synthetic sets' ~0.4 KB: assumed).
MANIFEST_BYTES_PER_QUERY = 500
#: A build's default images per block (``lens-cache build --block-size``).
BLOCK_SIZE = 32
#: Training FLOPs per forward FLOP (forward + backward through activations and weights).
TRAIN_FLOPS_PER_FORWARD = 3

#: The help of ``lens-cache estimate``'s options (the command in :mod:`lens_cache.cli` stays a list of them).
OPTION_HELP = {
    "split": "Split spec(s), comma-separated for several stores: refcoco:train, refcoco:train,refcoco+:train, ...",
    "data_root": "LISA-style dataset folder: count the manifest of each split whose data is there "
                 "(else its published figures; synthetic specs are always counted).",
    "mllm": "As for build: 'toy', 'tiny', ..., a checkpoint folder, or a published HF id (llava-hf/llava-1.5-7b-hf, "
            "Qwen/Qwen2-VL-2B-Instruct, llava-hf/llava-onevision-qwen2-7b-ov-hf): no weights are read.",
    "layers": "Layers to cache, comma-separated [as build: the MLLM's main layer].",
    "sam": "vit_h, vit_l, vit_b (':PATH' allowed, not read), tiny or toy [toy for toy, tiny for tiny*, else vit_h].",
    "compression": "lossless, bitround, int8 or none, as for build.",
    "gpu": "h100 (SXM), h100-pcie, h100-nvl, h200, a100, l40s, a10g or l4: its dense bf16 peak.",
    "mfu": "Model FLOPs utilisation assumed for the hours (the ceiling, MFU 1, is shown too).",
    "preset": "Training preset (name or .json) for the stage-2 time [the one made for the MLLM].",
    "question_set": "authors or single, as for build [the MLLM's].",
    "device": "cuda or cpu: the build's compute dtype, which the warm-start layers are saved in (bfloat16 / float32).",
    "train_samples_per_s": "A measured stage-2 rate to use instead of the FLOP model's projection.",
    "json": "Print one JSON object instead of the table.",
}


@dataclass(frozen=True)
class EstimateRequest:
    """The options of ``lens-cache estimate`` (see its help)."""

    splits: tuple[str, ...]
    mllm: str
    sam: str
    layers: tuple[int, ...]
    data_root: Path | None = None
    compression: str = "lossless"
    gpu: str = "h100"
    mfu: float = 0.4
    preset: str | None = None
    device: str = "cuda"
    seed: int = 0
    train_samples_per_s: float | None = None


@dataclass(frozen=True)
class SplitCount:
    """Images and queries of one split, where they come from, and its questions' lengths."""

    spec: str
    images: int
    queries: int
    counts_from: str  # "manifest" or "published"
    source: str
    profile: TextProfile
    manifest_bytes: int | None  # the manifest file's bytes (None: no manifest, assumed per query)
    note: str = ""


def count_split(spec: str, request: EstimateRequest, mllm: MllmShape) -> SplitCount:
    """Count ``spec`` from its manifest (data here, or a synthetic spec), else from its published figures.

    Raises:
        ManifestError: an unknown split; a data root that does not exist; data that is there but broken.
        UsageError: no data and no published figure for the split (the message says to give ``--data-root``).
    """
    from lens_manifests import ManifestError, parse_spec
    from lens_manifests.published_counts import published_count

    name, split = parse_spec(spec)
    note = ""
    if request.data_root is not None or name.startswith("synthetic"):
        try:
            return _from_manifest(f"{name}:{split}", request, mllm)
        except ManifestError as error:
            if request.data_root is None or not request.data_root.is_dir() or "not found" not in str(error):
                raise
            note = f"no data for it under {request.data_root} ({error}): published figures used"
    count, why = published_count(spec)
    if count is None:
        raise UsageError(f"{name}:{split}: {why}; give --data-root with its data to count its manifest")
    words, words_from = count.mean_words, count.words_from
    if words is None:
        words, words_from = ASSUMED_WORDS[count.task], f"{ASSUMED_WORDS[count.task]:g} words assumed, not published"
    profile = typical_profile(mllm, words, count.task == "reasoning", count.queries, words_from)
    source = f"{count.source}; queries {count.queries_from}"
    return SplitCount(f"{name}:{split}", count.images, count.queries, "published", source, profile, None, note)


def _from_manifest(spec: str, request: EstimateRequest, mllm: MllmShape) -> SplitCount:
    from lens_cache.store_create import manifest_to_parquet_bytes
    from lens_manifests import build_manifest

    table = build_manifest(spec, request.data_root, seed=request.seed)
    images = len(set(zip(table.column("dataset").to_pylist(), table.column("image_id").to_pylist(), strict=True)))
    profile = text_profile(mllm, table.column("text").to_pylist(), table.column("is_sentence").to_pylist())
    return SplitCount(spec, images, table.num_rows, "manifest", f"the manifest of {spec}", profile,
                      len(manifest_to_parquet_bytes(table, spec=spec)))


# ----------------------------------------------------------------------------- bytes


@dataclass(frozen=True)
class StoreBytes:
    """The bytes of one store: per image, per query, once per store; the files; the free disk it needs."""

    per_image: float
    per_query: float
    fixed: int
    total: int
    files: int
    free_disk: int
    parts: dict[str, int] = field(default_factory=dict)


def made_up_attrs(images: int, queries: int, mllm: MllmShape, sam: SamShape, layers: Sequence[int],
                  profile: TextProfile) -> dict[str, Any]:
    """The ``lens_cache`` attributes a store of these sizes would have (what :func:`store_arrays` reads)."""
    blocks = max(1, -(-images // BLOCK_SIZE))
    attrs: dict[str, Any] = {
        "num_images": images, "num_queries": queries, "num_blocks": blocks, "block_size": BLOCK_SIZE,
        "num_image_tokens": mllm.num_image_tokens, "hidden_size": mllm.hidden_size,
        "max_text_len": profile.max_eval, "sam_channels": sam.channels, "layers": list(layers),
        "checksums": {"block_queries": max(1, math.ceil(queries / blocks))},
        "prefix": {"length": mllm.prefix_tokens} if mllm.prefix_tokens else None,
    }
    if profile.slots:
        attrs["text_variants"] = {"count": profile.slots + 1, "max_len": max(1, profile.max_training)}
    return attrs


def store_bytes(split: SplitCount, mllm: MllmShape, sam: SamShape, request: EstimateRequest) -> StoreBytes:
    """The bytes of the store of ``split`` (see the module docstring for what is counted and how)."""
    import numpy as np
    from lens_cache.store_format import (
        CODEC_FEATURES, SHARED, TEXT_STATES, TEXT_VARIANTS, is_image_array, is_query_array, store_arrays,
    )

    ratio = COMPRESSION_RATIOS[request.compression][0]
    attrs = made_up_attrs(split.images, split.queries, mllm, sam, request.layers, split.profile)
    arrays = store_arrays(attrs)
    parts = {"image": 0.0, "query": 0.0, "fixed": 0.0}
    raw_total, files = 0.0, 0
    for array in arrays:
        raw = math.prod(array.shape) * np.dtype(array.dtype).itemsize
        if array.spec in (TEXT_STATES, TEXT_VARIANTS) and request.compression != "none":  # zero padding: ~nothing
            tokens = split.profile.mean_eval if array.spec is TEXT_STATES else split.profile.mean_training_sum
            raw = split.queries * tokens * mllm.hidden_size * 2
        stored = raw * ratio if array.spec.codec == CODEC_FEATURES else raw
        kind = ("fixed" if array.spec.kind == SHARED or not (is_image_array(array.name) or is_query_array(array.name))
                else "image" if is_image_array(array.name) else "query")
        parts[kind] += stored
        raw_total += raw
        files += math.prod(-(-s // c) for s, c in zip(array.shape, array.chunks, strict=True)) + 1  # + zarr.json
    once = _once_per_store(split, mllm, request, len(arrays))
    fixed = int(parts["fixed"]) + sum(once.values())
    total = int(parts["image"] + parts["query"]) + fixed
    files += 2  # the manifest and the warm-start file
    free = int(raw_total) + sum(once.values()) + files * FS_BLOCK
    return StoreBytes(
        per_image=parts["image"] / max(split.images, 1), per_query=parts["query"] / max(split.queries, 1),
        fixed=fixed, total=total, files=files, free_disk=free,
        parts={"image_arrays": int(parts["image"]), "query_arrays": int(parts["query"]),
               "once_arrays": int(parts["fixed"]), **once},
    )


def _once_per_store(split: SplitCount, mllm: MllmShape, request: EstimateRequest, arrays: int) -> dict[str, int]:
    """What a store keeps once besides its arrays: the warm-start layers, the manifest, the Zarr metadata."""
    from lens_cache.warm_start import warm_start_layers

    # each cached layer k whose decoder layers k, k + 1 exist (0-based) adds them, each decoder layer once
    decoder_layers = {i for layer in request.layers if layer + 1 < mllm.num_layers for i in warm_start_layers(layer)}
    warm = len(decoder_layers) * mllm.decoder_layer_params() * DTYPE_BYTES[request.device]
    manifest = split.manifest_bytes if split.manifest_bytes is not None else split.queries * MANIFEST_BYTES_PER_QUERY
    groups = 5 if mllm.prefix_tokens else 4
    return {"warm_start": warm + (100 * 12 * len(decoder_layers) if warm else 0), "manifest": manifest,
            "metadata": META_ROOT + META_PER_GROUP * groups + META_PER_ARRAY * arrays}


# ----------------------------------------------------------------------------- compute


def gpu_peak(gpu: str) -> tuple[float, str]:
    """(dense bf16 peak FLOP/s, its name) of ``--gpu``."""
    from lens_cache.flops import PEAK_BF16_DENSE

    key = GPUS.get(gpu.lower())
    if key is None:
        raise UsageError(f"unknown --gpu {gpu!r}: one of {', '.join(GPUS)}")
    return PEAK_BF16_DENSE[key], key


def build_flops(split: SplitCount, mllm: MllmShape, sam: SamShape, layers: Sequence[int]) -> tuple[int, float] | None:
    """(FLOPs per image, mean FLOPs per query) of the build, or None where the FLOP model has no such MLLM."""
    from lens_cache.flops import backbone_workload

    rows = [row for row in split.profile.rows if row and row[0] > 0] or [(1,)]
    lengths = [n for row in rows for n in row if n > 0]
    try:
        workload = backbone_workload(mllm.flop_view(), prefix_tokens=mllm.decoder_prefix, suffix_tokens=lengths,
                                     deepest_layer=max(layers), sam_flops=sam.flops)
    except ValueError:
        return None
    return workload.build_per_image, sum(workload.build_queries) / len(rows)


@dataclass(frozen=True)
class TrainPlan:
    """Stage 2 of a preset: its samples, FLOPs per sample, rate and hours."""

    preset: str
    samples: int
    schedule: str
    flops_per_sample: float
    head_tokens: int
    samples_per_s: float
    rate_from: str
    hours: float
    note: str = ""


def read_preset(name_or_path: str) -> dict[str, Any]:
    """A training preset's JSON, by name (the files of ``lens_train/training/presets``, found without importing
    lens_train: stage 1 does not depend on stage 2) or by path."""
    import importlib.util

    path = Path(name_or_path)
    if path.suffix != ".json":
        spec = importlib.util.find_spec("lens_train")
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(folders[0]) / "training" / "presets" / f"{name_or_path}.json" if folders else path
    if not path.is_file():
        folder = path.parent
        names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise UsageError(f"unknown preset {name_or_path!r}: one of {names} or a .json path")
    return json.loads(path.read_text())


def train_plan(preset: str, profile: TextProfile, mllm: MllmShape, peak: float, request: EstimateRequest) -> TrainPlan:
    """Stage 2 of ``preset`` at the projected rate (or ``--train-samples-per-s``), see the module docstring."""
    from lens_cache.flops import decoder_flops

    raw = read_preset(preset)
    model, train = raw["model"], raw["train"]
    samples = int(train["steps"]) * int(train["batch_size"]) * int(train["grad_accum"])
    schedule = f"{train['steps']} steps x batch {train['batch_size']} x grad_accum {train['grad_accum']}"
    prefix = mllm.prefix_tokens if model.get("head_input") == "full_sequence" else 0
    tokens = round(prefix + mllm.num_image_tokens + profile.mean_training)
    forward = decoder_flops(tokens, 0, layers=2, hidden=int(model["hidden_size"]), intermediate=int(model["mlp_size"]),
                            num_heads=int(model["num_heads"]), num_kv_heads=model.get("num_key_value_heads"))
    per_sample = TRAIN_FLOPS_PER_FORWARD * forward
    if request.train_samples_per_s is not None:
        rate, rate_from = request.train_samples_per_s, "given (--train-samples-per-s)"
    else:
        rate = peak * request.mfu / per_sample
        rate_from = f"projected from the FLOP model at MFU {request.mfu:g}, unmeasured"
    made_for = (raw.get("made_for") or {}).get("hidden_size")
    note = (f"preset {preset} is made for d={made_for}, this MLLM has d={mllm.hidden_size}: lens-train would refuse "
            "its stores" if made_for not in (None, mllm.hidden_size) else "")
    if train.get("precision") == "fp32":
        note = (note + "; " if note else "") + "the preset trains in float32: the bf16 peak overstates its rate"
    return TrainPlan(Path(preset).stem, samples, schedule, per_sample, tokens, rate, rate_from,
                     samples / rate / 3600, note)


# ----------------------------------------------------------------------------- all of it


@dataclass(frozen=True)
class SplitEstimate:
    """One store: its counts, bytes and build FLOPs."""

    count: SplitCount
    bytes: StoreBytes
    flops: tuple[int, float] | None

    @property
    def build_flops(self) -> float | None:
        if self.flops is None:
            return None
        return self.count.images * self.flops[0] + self.count.queries * self.flops[1]


@dataclass(frozen=True)
class Estimate:
    """Everything ``lens-cache estimate`` reports (:mod:`lens_cache.estimate_report` renders it)."""

    request: EstimateRequest
    mllm: MllmShape
    sam: SamShape
    splits: tuple[SplitEstimate, ...]
    peak: float
    gpu: str
    train: TrainPlan | None
    train_note: str = ""


def estimate(request: EstimateRequest, mllm: MllmShape, sam: SamShape) -> Estimate:
    """The estimate of ``request`` for the resolved backbones (:mod:`lens_cache.estimate_inputs`).

    Raises:
        UsageError / ManifestError: a bad option, an unknown split, a split with no data and no published figure.
    """
    if request.compression not in COMPRESSION_RATIOS:
        raise UsageError(f"unknown --compression {request.compression!r}: one of {', '.join(COMPRESSION_RATIOS)}")
    if not 0 < request.mfu <= 1:
        raise UsageError(f"--mfu takes a fraction in (0, 1], got {request.mfu:g}")
    if request.device not in DTYPE_BYTES:
        raise UsageError(f"--device is cuda or cpu, got {request.device!r}")
    mllm.check_layers(request.layers)
    peak, gpu = gpu_peak(request.gpu)
    splits = []
    for spec in request.splits:
        count = count_split(spec, request, mllm)
        splits.append(SplitEstimate(count, store_bytes(count, mllm, sam, request),
                                    build_flops(count, mllm, sam, request.layers)))
    preset = request.preset or mllm.preset
    train, note = None, ""
    if preset is None:
        note = f"no training preset is made for {mllm.name}: give --preset"
    else:
        train = train_plan(preset, _training_profile(splits), mllm, peak, request)
    return Estimate(request, mllm, sam, tuple(splits), peak, gpu, train, note)


def run_estimate(split: str, mllm: str, *, layers: tuple[int, ...] | None = None, sam: str | None = None,
                 question_set: str | None = None, **options: Any) -> Estimate:
    """``lens-cache estimate``: resolve the backbones (:mod:`lens_cache.estimate_inputs`), then :func:`estimate`.

    Args:
        split: one spec or several, comma-separated.
        mllm, layers, sam, question_set: as for ``lens-cache build`` (None: the MLLM's defaults).
        options: the other fields of :class:`EstimateRequest`.
    """
    from lens_cache.estimate_inputs import default_sam, resolve_mllm, resolve_sam

    shape = resolve_mllm(mllm, question_set)
    request = EstimateRequest(splits=tuple(part.strip() for part in split.split(",") if part.strip()), mllm=mllm,
                              sam=sam or default_sam(mllm), layers=layers or shape.default_layers, **options)
    if not request.splits:
        raise UsageError("give --split SPEC (e.g. refcoco:train), or several separated by commas")
    return estimate(request, shape, resolve_sam(request.sam))


def _training_profile(splits: Sequence[SplitEstimate]) -> TextProfile:
    """The questions of every split together (stage 2 draws from all of them)."""
    first = splits[0].count.profile
    rows = tuple(row for s in splits for row in s.count.profile.rows)
    return replace(first, rows=rows, total=sum(s.count.queries for s in splits))
