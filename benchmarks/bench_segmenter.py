"""``Segmenter.batch`` against one-by-one calls: many instructions on few images, live backbones.

What it measures, on one device, with a trained head (default: ``toy``, the head shipped beside the
toy backbones, which runs on the CPU):

- **one by one**: ``seg(image, instruction)`` for every pair: the MLLM's image prefix and SAM's
  image encoder run once per instruction;
- **batched**: ``seg.batch(pairs, batch_size=B)``: pairs grouped by image, B images per backbone
  forward, each image's prefix and SAM embedding once for all its instructions, one head forward per
  group;

over ``--images`` synthetic ``synthetic:val`` images with ``--instructions`` instructions each (the
image's own queries first, then generic ones), after one warm-up call. Each mode runs ``--repeats``
times; the best time counts. Reported: items/s and images/s of both, the speed-up, and the largest
difference between their mask logits (float rounding from batching).

    python benchmarks/bench_segmenter.py --images 8 --instructions 3 --device cpu

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

GENERIC = ("the biggest shape", "the shape at the top", "the thing on the left", "the smallest object")


def pairs_for(images: int, instructions: int, work: Path) -> list[tuple[str, str]]:
    """``images`` x ``instructions`` (image path, instruction) pairs from a synthetic val split."""
    from lens_manifests import build_manifest
    from lens_train.testing import small_synthetic

    root = small_synthetic(work / "synthetic", images=images)
    manifest = build_manifest("synthetic:val", root)
    by_image: dict[str, list[str]] = {}
    for path, text in zip(manifest.column("image_path").to_pylist(), manifest.column("text").to_pylist()):
        by_image.setdefault(path, []).append(text)
    chosen = list(by_image.items())[:images]
    if len(chosen) < images:
        raise SystemExit(f"only {len(chosen)} synthetic val images with queries")
    pairs = []
    for path, texts in chosen:
        asked = (texts + [g for g in GENERIC if g not in texts])[:instructions]
        pairs += [(path, text) for text in asked]
    return pairs


def best_of(repeats: int, run) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        value = run()
        best = min(best, time.perf_counter() - started)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="toy", help="run folder, model folder or toy")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--instructions", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="images per backbone forward")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    args = parser.parse_args()

    import torch

    from lens_train import Segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = pairs_for(args.images, args.instructions, Path(tmp))
        seg = Segmenter.from_pretrained(args.checkpoint, device=args.device)
        seg(*pairs[0])  # warm-up: first-call allocations and lazy imports
        seg.batch(pairs[: args.instructions], batch_size=args.batch_size)
        print(f"{len(pairs)} pairs on {args.images} images; one by one ...", file=sys.stderr, flush=True)
        single_s, singles = best_of(args.repeats, lambda: [seg(image, text) for image, text in pairs])
        print(f"one by one: {single_s:.2f} s; batched ...", file=sys.stderr, flush=True)
        batch_s, batched = best_of(args.repeats, lambda: seg.batch(pairs, batch_size=args.batch_size))
    diff = max(float((a.logits - b.logits).abs().max()) for a, b in zip(singles, batched))
    masks_equal = sum(bool((a.mask == b.mask).all()) for a, b in zip(singles, batched))
    report = {
        "checkpoint": args.checkpoint, "device": str(seg.device), "threads": torch.get_num_threads(),
        "images": args.images, "instructions_per_image": args.instructions, "items": len(pairs),
        "batch_size": args.batch_size, "repeats": args.repeats,
        "one_by_one": {"seconds": round(single_s, 3), "items_per_s": round(len(pairs) / single_s, 2),
                       "images_per_s": round(args.images / single_s, 2)},
        "batched": {"seconds": round(batch_s, 3), "items_per_s": round(len(pairs) / batch_s, 2),
                    "images_per_s": round(args.images / batch_s, 2)},
        "speedup": round(single_s / batch_s, 2),
        "max_abs_logit_difference": diff, "identical_masks": f"{masks_equal}/{len(pairs)}",
        "platform": platform.platform(), "torch": torch.__version__,
    }
    print(f"one by one {report['one_by_one']['items_per_s']} items/s, batched {report['batched']['items_per_s']} "
          f"items/s: x{report['speedup']}", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
