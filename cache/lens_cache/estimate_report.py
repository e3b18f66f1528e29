"""``lens-cache estimate``'s output: one JSON object (:func:`as_json`) or a readable table (:func:`report_lines`).

Sizes in the table are in units of 1024 (``KB``, ``MB``, ``GB``, ``TB``), as ``lens-cache info`` prints a
built store's, so the two compare directly; the JSON gives bytes, FLOPs and hours as plain numbers.
"""

from __future__ import annotations

from typing import Any

from lens_cache.estimate import COMPRESSION_RATIOS, Estimate, SplitEstimate


def human(size: float) -> str:
    """Bytes in units of 1024, as ``lens-cache info``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} PB"


def flops_text(flops: float) -> str:
    """FLOPs in GFLOP, TFLOP or PFLOP."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops / 1e9:,.2f} GFLOP"


def hours_text(hours: float) -> str:
    """Hours, or seconds below a minute."""
    return f"{hours:,.2f} h" if hours * 3600 >= 60 else f"{hours * 3600:.1f} s"


def _sum(estimate: Estimate, attribute: str) -> int:
    return sum(getattr(s.bytes, attribute) for s in estimate.splits)


def _counts_from(estimate: Estimate) -> str:
    sources = {s.count.counts_from for s in estimate.splits}
    return sources.pop() if len(sources) == 1 else "mixed"


def _build_flops(estimate: Estimate) -> float | None:
    values = [s.build_flops for s in estimate.splits]
    return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]


def _hours(flops: float | None, peak: float, mfu: float) -> float | None:
    return None if flops is None else flops / (peak * mfu) / 3600


def _split_json(split: SplitEstimate) -> dict[str, Any]:
    count, size, profile = split.count, split.bytes, split.count.profile
    return {
        "split": count.spec, "images": count.images, "queries": count.queries, "counts_from": count.counts_from,
        "source": count.source, "note": count.note,
        "text_tokens": {"eval_mean": round(profile.mean_eval, 2), "eval_max": profile.max_eval,
                        "training_sum_mean": round(profile.mean_training_sum, 2), "training_max": profile.max_training,
                        "training_slots": profile.slots, "from": profile.source},
        "store_bytes": size.total, "bytes_per_image": round(size.per_image), "bytes_per_query": round(size.per_query),
        "bytes_once": size.fixed, "bytes_parts": size.parts, "files": size.files, "free_disk_bytes": size.free_disk,
        "flops_per_image": split.flops[0] if split.flops else None,
        "flops_per_query": round(split.flops[1]) if split.flops else None, "build_flops": split.build_flops,
    }


def as_json(estimate: Estimate) -> dict[str, Any]:
    """The estimate as one JSON object (sizes in bytes; totals over the splits, then each split)."""
    request, mllm, sam, train = estimate.request, estimate.mllm, estimate.sam, estimate.train
    images = sum(s.count.images for s in estimate.splits)
    queries = sum(s.count.queries for s in estimate.splits)
    image_bytes = sum(s.bytes.parts["image_arrays"] for s in estimate.splits)
    query_bytes = sum(s.bytes.parts["query_arrays"] for s in estimate.splits)
    flops = _build_flops(estimate)
    ratio, kind = COMPRESSION_RATIOS[request.compression]
    return {
        "splits": [_split_json(s) for s in estimate.splits],
        "images": images, "queries": queries, "counts_from": _counts_from(estimate),
        "mllm": {"name": mllm.name, "model_type": mllm.model_type, "hidden_size": mllm.hidden_size,
                 "decoder_layers": mllm.num_layers, "image_tokens": mllm.num_image_tokens,
                 "prefix_tokens": mllm.prefix_tokens, "question_set": mllm.question_set.name,
                 "dims_from": mllm.dims_from, "tokens_from": mllm.tokens_from},
        "layers": list(request.layers), "sam": {"variant": sam.variant, "channels": sam.channels},
        "compression": request.compression, "compression_ratio": ratio, "bytes_are": kind,
        "store_bytes": _sum(estimate, "total"), "bytes_per_image": round(image_bytes / max(images, 1)),
        "bytes_per_query": round(query_bytes / max(queries, 1)), "bytes_once": _sum(estimate, "fixed"),
        "free_disk_bytes": _sum(estimate, "free_disk"), "files": _sum(estimate, "files"),
        "gpu": estimate.gpu, "peak_flops": estimate.peak, "mfu": request.mfu, "build_flops": flops,
        "build_gpu_hours": _hours(flops, estimate.peak, request.mfu),
        "build_gpu_hours_at_peak": _hours(flops, estimate.peak, 1.0),
        "build_hours_are": "computed from the FLOP model, not measured",
        "preset": train.preset if train else None, "train_samples": train.samples if train else None,
        "train_flops_per_sample": train.flops_per_sample if train else None,
        "train_samples_per_s": train.samples_per_s if train else None,
        "train_rate_from": train.rate_from if train else None, "train_hours": train.hours if train else None,
        "notes": notes(estimate),
    }


def notes(estimate: Estimate) -> list[str]:
    """What the reader must know to trust the figures."""
    request, mllm = estimate.request, estimate.mllm
    ratio = COMPRESSION_RATIOS[request.compression][0]
    lines = {
        "none": "compression none: the features are stored raw, so the bytes follow from the format exactly",
        "lossless": "compression lossless (zstd): bytes at ratio 1, an upper bound (zstd saves ~8% on real float16 "
                    "activations, ~18% on the tiny SAM's embeddings; no rule guarantees either)",
        "bitround": f"compression bitround: bytes at ratio {ratio:.3f} (7 of 10 mantissa bits kept, then zstd): "
                    "approximate",
        "int8": f"compression int8: bytes at ratio {ratio:.4f} (int8 values + a float16 scale per row of 4096, before "
                "zstd): an upper bound at LLaVA-1.5-7B's size (0.445 after zstd on synthetic features)",
    }
    out = [lines[request.compression],
           f"dimensions from {mllm.dims_from}; question lengths from {mllm.tokens_from}",
           "free disk: the store at ratio 1 + 4 KiB per file; the writer checks no free disk (a full disk "
           "stops the build in one line; a rerun resumes)",
           "GPU-hours: computed from the FLOP model (lens_cache.flops) over the datasheet dense bf16 peak, "
           "not measured; image decoding and writing the store's bytes are not in it"]
    out += [f"{s.count.spec}: {s.count.note}" for s in estimate.splits if s.count.note]
    if request.compression == "none" and any(s.count.counts_from == "published" for s in estimate.splits):
        out.append("published counts: no manifest, so the longest question (what compression none pads every "
                   "query's text to) is taken as the typical one: an underestimate")
    out += [f"{s.count.spec}: the FLOP model has no {mllm.model_type!r} MLLM: no GPU-hours"
            for s in estimate.splits if s.flops is None][:1]
    if estimate.train_note:
        out.append(estimate.train_note)
    if estimate.train is not None and estimate.train.note:
        out.append(estimate.train.note)
    return out


def _split_lines(split: SplitEstimate) -> list[str]:
    count, size, profile = split.count, split.bytes, split.count.profile
    lines = [
        f"{count.spec}",
        f"  counts       {count.images:,} images, {count.queries:,} queries ({count.counts_from}: {count.source})",
        f"  questions    L_t mean {profile.mean_eval:.1f} (evaluation, longest {profile.max_eval})"
        + (f" + {profile.mean_training_sum:.1f} over {profile.slots} training variant slot(s) (longest "
           f"{profile.max_training})" if profile.slots else "") + f"; {profile.source}",
        f"  per image    {human(size.per_image)}    per query {human(size.per_query)}    once per store "
        f"{human(size.fixed)} (warm start {human(size.parts['warm_start'])}, manifest {human(size.parts['manifest'])})",
        f"  store        {human(size.total)}    free disk {human(size.free_disk)} ({size.files:,} files)",
    ]
    if split.flops is not None:
        lines.append(f"  build FLOPs  {flops_text(split.flops[0])} per image + {flops_text(split.flops[1])} per query "
                     f"= {flops_text(split.build_flops)}")
    return lines


def report_lines(estimate: Estimate) -> list[str]:
    """The readable table: the backbones, each split, the totals, stage 2, the notes."""
    request, mllm, sam, train = estimate.request, estimate.mllm, estimate.sam, estimate.train
    data = as_json(estimate)
    lines = [
        f"mllm         {mllm.name} ({mllm.model_type}: d={mllm.hidden_size}, {mllm.num_layers} decoder layers, "
        f"{mllm.num_image_tokens} image tokens, {mllm.prefix_tokens} prompt tokens before the image), "
        f"layers {list(request.layers)}, question set {mllm.question_set.name!r}",
        f"sam          {sam.variant} (C={sam.channels}, {flops_text(sam.flops)} per image)",
        f"storage      float16, compression {request.compression} ({data['bytes_are']}), warm start in "
        f"{'bfloat16 (CUDA build)' if request.device == 'cuda' else 'float32 (CPU build)'}",
    ]
    for split in estimate.splits:
        lines += _split_lines(split)
    lines += [
        f"total        {data['images']:,} images, {data['queries']:,} queries ({data['counts_from']}); store "
        f"{human(data['store_bytes'])} ({human(data['bytes_per_image'])} per image, "
        f"{human(data['bytes_per_query'])} per query); free disk {human(data['free_disk_bytes'])}",
    ]
    if data["build_gpu_hours"] is not None:
        lines.append(f"build        {flops_text(data['build_flops'])} on one {estimate.gpu} "
                     f"({estimate.peak / 1e12:.0f} TFLOP/s dense bf16): {hours_text(data['build_gpu_hours_at_peak'])} "
                     f"at MFU 1 (ceiling), {hours_text(data['build_gpu_hours'])} at MFU {request.mfu:g} "
                     "(assumed): GPU time computed, not measured")
    if train is not None:
        lines.append(f"stage 2      preset {train.preset}: {train.schedule} = {train.samples:,} samples; "
                     f"{flops_text(train.flops_per_sample)} per sample (3 x the head's 2 layers over "
                     f"{train.head_tokens} tokens); {train.samples_per_s:,.0f} samples/s ({train.rate_from}) "
                     f"-> {hours_text(train.hours)}")
    lines += [f"note         {line}" for line in notes(estimate)]
    return lines
