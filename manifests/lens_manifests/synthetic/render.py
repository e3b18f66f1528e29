"""Rendering of the synthetic dataset: one image and its annotation per call, in the real formats.

``_render_reason`` writes a ReasonSeg ``NAME.jpg + NAME.json``, ``_render_sem`` an ADE20K image and
label PNG, ``_render_refer`` a REFER image (its record goes into the index that
:mod:`.publish` writes). Every image has its own generator, seeded from
``(seed, set, split, index)`` (:func:`_item_rng`), so :func:`_render_all` may spread the
work over processes without changing a pixel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .language import pick_reason_query, reason_scene, refer_scene, refer_sentences
from .scenes import SHAPE_KINDS, SYNTHETIC_CLASSES, make_scene

REFER_NAME = "synthref"
JPEG_QUALITY = 95

_SET_CODES = {"reason": 1, "refer": 2, "sem": 3}
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "testA": 4, "testB": 5}
_ADE_SUBDIRS = {"train": "training", "val": "validation", "test": "testing"}


def _item_rng(seed: int, set_name: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SET_CODES[set_name], _SPLIT_CODES[split], int(index)])


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, quality=JPEG_QUALITY)


def _render_reason(root: Path, split: str, index: int, seed: int) -> int:
    """Write one ReasonSeg-format image + json; returns the number of queries it yields."""
    out_dir = root / "reason_seg" / "ReasonSeg" / split
    rng = _item_rng(seed, "reason", split, index)
    scene, candidates = reason_scene(rng)
    query = pick_reason_query(candidates, rng)
    k = int(rng.integers(2, len(query.texts) + 1)) if len(query.texts) > 1 else 1
    texts = [query.texts[int(j)] for j in rng.permutation(len(query.texts))[:k]]
    shapes_json: list[dict[str, Any]] = []
    for label, members in (("target", query.targets), ("ignore", query.ignores)):
        for j in members:
            shapes_json.append({"label": label, "points": scene.shapes[j].polygon.tolist(), "shape_type": "polygon"})
    if rng.random() < 0.1:  # ReasonSeg files carry a few meaningless "flag" shapes
        x, y = int(rng.integers(0, scene.width - 10)), int(rng.integers(0, scene.height - 10))
        flag = [[x, y], [x + 8, y], [x + 8, y + 8], [x, y + 8]]
        shapes_json.append({"label": "flag", "points": flag, "shape_type": "polygon"})
    name = f"synth_{split}_{index:05d}"
    _save_jpeg(scene.image, out_dir / f"{name}.jpg")
    anno = {
        "text": texts,
        "is_sentence": query.is_sentence,
        "shapes": shapes_json,
        "imagePath": f"{name}.jpg",
        "imageHeight": scene.height,
        "imageWidth": scene.width,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(anno))
    return len(texts) if split == "train" else 1


def _rim(mask: np.ndarray) -> np.ndarray:
    """Pixels 4-adjacent to ``mask`` but outside it."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def _render_sem(root: Path, split: str, index: int, seed: int) -> int:
    """Write one ADE20K-format image + label PNG; returns 1."""
    sub = _ADE_SUBDIRS[split]
    rng = _item_rng(seed, "sem", split, index)
    scene = make_scene(rng, rule="cv2")
    label = np.full((scene.height, scene.width), SYNTHETIC_CLASSES.index("background") + 1, dtype=np.uint8)
    union = np.zeros(label.shape, dtype=bool)
    for s in scene.shapes:
        label[s.mask] = SYNTHETIC_CLASSES.index(s.kind) + 1
        union |= s.mask
    label[_rim(union)] = 0  # ADE's "unlabelled": the JPEG-blurred border is not scored
    name = f"synth_{sub}_{index:05d}"
    _save_jpeg(scene.image, root / "ade20k" / "images" / sub / f"{name}.jpg")
    Image.fromarray(label).save(root / "ade20k" / "annotations" / sub / f"{name}.png")
    return 1


def _refer_file_name(split: str, index: int) -> str:
    return f"synth_{split}_{index:05d}.jpg"


def _render_refer(root: Path, split: str, index: int, seed: int) -> dict[str, Any]:
    """Write one REFER-format image; returns its record (ids are given out later, in order)."""
    rng = _item_rng(seed, "refer", split, index)
    scene = refer_scene(rng)
    file_name = _refer_file_name(split, index)
    _save_jpeg(scene.image, root / "refer_seg" / "images" / REFER_NAME / file_name)
    objects = []
    for i, s in enumerate(scene.shapes):
        options = refer_sentences(scene, i)
        k = int(rng.integers(1, min(3, len(options)) + 1)) if options else 0
        objects.append(
            {
                "category_id": SHAPE_KINDS.index(s.kind) + 1,
                "segmentation": [s.polygon.reshape(-1).astype(float).tolist()],
                "area": float(s.area),
                "bbox": list(s.bbox),
                # no phrase singles the shape out -> not a ref (as for many RefCOCO objects)
                "sentences": [options[int(j)] for j in rng.permutation(len(options))[:k]],
            }
        )
    return {"file_name": file_name, "height": scene.height, "width": scene.width, "objects": objects}


def _refer_splits(num_train: int, num_val: int, num_test: int) -> list[tuple[str, int]]:
    test_a = (num_test + 1) // 2
    return [("train", num_train), ("val", num_val), ("testA", test_a), ("testB", num_test - test_a)]


_RENDERERS: dict[str, Callable[[Path, str, int, int], Any]] = {
    "reason": _render_reason,
    "refer": _render_refer,
    "sem": _render_sem,
}


def _render_chunk(root: Path, set_name: str, split: str, start: int, stop: int, seed: int) -> list[Any]:
    """Render images ``start..stop-1`` of one set and split (runs in a worker process)."""
    render = _RENDERERS[set_name]
    return [render(root, split, index, seed) for index in range(start, stop)]


def _render_all(root: Path, jobs: list[tuple[str, str, int]], seed: int, workers: int) -> dict[tuple[str, str], list]:
    """Render every (set, split, count) job, in chunks over ``workers`` processes; results in order."""
    chunk = 25
    tasks = [(name, split, a, min(a + chunk, n)) for name, split, n in jobs for a in range(0, n, chunk)]
    results: dict[tuple[str, str], list] = {(name, split): [] for name, split, _ in jobs}
    if workers <= 1 or len(tasks) <= 1:
        outputs = [_render_chunk(root, *t, seed) for t in tasks]
    else:
        # Every image has its own seeded generator, so the split into processes
        # cannot change a single pixel.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(_render_chunk, *zip(*[(root, *t, seed) for t in tasks], strict=True)))
    for (name, split, _, _), out in zip(tasks, outputs, strict=True):
        results[(name, split)].extend(out)
    return results


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
