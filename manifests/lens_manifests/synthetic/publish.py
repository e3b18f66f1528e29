"""Publishing the synthetic dataset: :func:`write_synthetic` renders every set into a temporary
folder, writes REFER's index and the completion marker, and renames the folder into place."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..common import ManifestError
from .render import _ADE_SUBDIRS, REFER_NAME, _default_workers, _refer_splits, _render_all
from .scenes import SHAPE_KINDS, SYNTHETIC_CLASSES

GENERATOR_VERSION = 1
MARKER = "SYNTHETIC_DONE.json"

DEFAULT_NUM_TRAIN = 200
DEFAULT_NUM_VAL = 40
DEFAULT_NUM_TEST = 40


def _write_refer_index(root: Path, records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Write ``instances.json`` and ``refs(unc).p`` from per-image records, numbering everything in order."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    image_id = ann_id = ref_id = sent_id = 0
    for split, recs in records.items():
        n_queries = 0
        for rec in recs:
            image_id += 1
            images.append(
                {"id": image_id, "file_name": rec["file_name"], "height": rec["height"], "width": rec["width"]}
            )
            for obj in rec["objects"]:
                ann_id += 1
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": obj["category_id"],
                        "segmentation": obj["segmentation"],
                        "area": obj["area"],
                        "bbox": obj["bbox"],
                        "iscrowd": 0,
                    }
                )
                if not obj["sentences"]:
                    continue
                ref_id += 1
                sentences = []
                for text in obj["sentences"]:
                    sent_id += 1
                    sentences.append({"sent": text, "raw": text, "sent_id": sent_id, "tokens": text.split()})
                refs.append(
                    {
                        "ref_id": ref_id,
                        "ann_id": ann_id,
                        "image_id": image_id,
                        "split": split,
                        "category_id": obj["category_id"],
                        "file_name": rec["file_name"],
                        "sent_ids": [x["sent_id"] for x in sentences],
                        "sentences": sentences,
                    }
                )
                n_queries += len(sentences)
        counts[split] = {"images": len(recs), "queries": n_queries}
    categories = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(SHAPE_KINDS)]
    ds_dir = root / "refer_seg" / REFER_NAME
    (ds_dir / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    # A JSON round trip first: pickle's bytes depend on which strings happen to be the
    # same object (worker processes vs. one process); rebuilt objects make them canonical.
    with open(ds_dir / "refs(unc).p", "wb") as f:
        pickle.dump(json.loads(json.dumps(refs)), f, protocol=2)  # REFER's own files are protocol-2 pickles
    return counts


def _params(seed: int, num_train: int, num_val: int, num_test: int) -> dict[str, int]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train_images": int(num_train),
        "num_val_images": int(num_val),
        "num_test_images": int(num_test),
    }


def read_marker(out_dir: str | Path) -> dict[str, Any] | None:
    """The completion marker of a synthetic folder, or None if it is absent/unreadable."""
    try:
        return json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_synthetic(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_train_images: int = DEFAULT_NUM_TRAIN,
    num_val_images: int = DEFAULT_NUM_VAL,
    num_test_images: int = DEFAULT_NUM_TEST,
    workers: int | None = None,
) -> dict[str, Any]:
    """Generate the synthetic dataset into ``out_dir``; returns the completion marker.

    Each of the three sets (ReasonSeg, REFER, ADE20K formats) gets the given
    number of images per split (REFER's test images are split into testA and
    testB). Idempotent: if ``out_dir/SYNTHETIC_DONE.json`` records the same
    parameters, nothing is done. The data is written into a temporary sibling
    folder and renamed into place, the marker written last, so a crash never
    leaves a folder that looks complete. A non-empty ``out_dir`` without a
    marker is not ours and is refused. ``workers`` processes render the
    images (default: up to 4, one per CPU); the result does not depend on it.
    """
    out_dir = Path(out_dir)
    params = _params(seed, num_train_images, num_val_images, num_test_images)
    marker = read_marker(out_dir)
    if marker is not None and marker.get("params") == params:
        return marker
    if out_dir.exists() and marker is None and any(out_dir.iterdir()):
        raise ManifestError(f"{out_dir} is not empty and has no {MARKER}; refusing to write synthetic data into it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        splits = {"train": num_train_images, "val": num_val_images, "test": num_test_images}
        for split in splits:
            (tmp / "reason_seg" / "ReasonSeg" / split).mkdir(parents=True)
            (tmp / "ade20k" / "images" / _ADE_SUBDIRS[split]).mkdir(parents=True)
            (tmp / "ade20k" / "annotations" / _ADE_SUBDIRS[split]).mkdir(parents=True)
        (tmp / "refer_seg" / REFER_NAME).mkdir(parents=True)
        (tmp / "refer_seg" / "images" / REFER_NAME).mkdir(parents=True)
        refer_splits = _refer_splits(num_train_images, num_val_images, num_test_images)
        jobs = [("reason", split, n) for split, n in splits.items()]
        jobs += [("sem", split, n) for split, n in splits.items()]
        jobs += [("refer", split, n) for split, n in refer_splits]
        results = _render_all(tmp, jobs, seed, workers if workers is not None else _default_workers())
        counts: dict[str, dict[str, Any]] = {
            "reason": {split: {"images": n, "queries": sum(results[("reason", split)])} for split, n in splits.items()},
            "refer": _write_refer_index(tmp, {split: results[("refer", split)] for split, _ in refer_splits}),
            "sem": {split: {"images": n} for split, n in splits.items()},
        }
        (tmp / "ade20k" / "synthetic_classes.json").write_text(json.dumps(list(SYNTHETIC_CLASSES)))
        result = {
            "params": params,
            "counts": counts,
            "seconds": round(time.perf_counter() - start, 2),
        }
        # Marker last, inside the temporary folder: the rename publishes data and marker together.
        (tmp / MARKER).write_text(json.dumps(result, indent=1))
        _publish(tmp, out_dir, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    final = read_marker(out_dir)
    if final is None:
        raise ManifestError(f"synthetic data in {out_dir} vanished right after writing it")
    return final


def _publish(tmp: Path, out_dir: Path, params: dict[str, int]) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``, replacing an outdated synthetic set."""
    old: Path | None = None
    if out_dir.exists():
        current = read_marker(out_dir)
        if current is not None and current.get("params") == params:
            return  # another process finished the same set first; keep theirs
        if current is None and any(out_dir.iterdir()):
            raise ManifestError(f"{out_dir} is not empty and has no {MARKER}; refusing to replace it")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if read_marker(out_dir) is None:  # lost a race against something that is not ours
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
