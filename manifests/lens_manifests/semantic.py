"""Semantic-segmentation adapters of LISA's training mix, in LISA's ``dataset_dir`` layout.

Every image yields one query per sampled class present in it: at most
``max_classes`` (3, LISA's ``num_classes_per_sample``) classes drawn without
replacement by a generator seeded from ``(seed, dataset, split, image_id)``,
so a manifest is a pure function of the data and the seed. Rows of one image
are ordered by class index. ``text`` is the class name, ``task`` ``semantic``.

Label-map sets (one PNG of class indices per image; pixels 255 are ignored and
stored as ``ignore_rle``)::

    ade20k/images/{training,validation}/NAME.jpg       ade20k/annotations/.../NAME.png
        value 0 (unlabelled) -> ignore, value v -> class v - 1 (150 classes)
    cocostuff/{train2017,val2017}/NAME.png             images: coco/{train2017,val2017}/NAME.jpg
        value v -> class v (182 labels); LISA ignores every class with "-" in its name
    mapillary/config_v2.0.json                          class names ("readable", lower-cased)
    mapillary/{training,validation}/v2.0/labels/NAME.png  images: mapillary/.../images/NAME.jpg

COCO-format part sets (no ignore region; images never opened)::

    vlpart/paco/annotations/paco_lvis_v1_{train,val,test}.json   images: coco/<file_name>
    vlpart/pascal_part/{train,val}.json
        images: vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<file_name>
        category "obj:part" -> "obj part" or "the part of the obj" (seeded coin, as LISA's random choice);
        PACO names drop LVIS's "_(sense)" suffix; a class's target is the union of its annotations.

Two deliberate departures from LISA, both for cleaner supervision: LISA's
part sets sample three *annotations* (so one class name can come with two
different instance masks); here a class is sampled and all its instances form
the target. Mapillary's "unlabeled" class is treated as ignore, not as a query.
Values beyond a class list are treated as ignore (LISA would fail on them).

What the dataset files say is checked as :mod:`.common` describes: a label map larger
than ``LENS_MAX_IMAGE_SIDE`` is skipped before it is decoded; a part set's image whose
``file_name`` leaves the image folder, or whose declared size is above the limit or
disagrees with the image's header, is skipped and listed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from .classes import ADE20K_CLASSES, COCOSTUFF_CLASSES
from .common import (
    ManifestError,
    QueryRow,
    Skipped,
    UnsafePathError,
    absolute,
    declared_size_problem,
    path_inside,
    require_path,
    rows_to_table,
    size_problem,
    stable_rng,
)
from .rle import IGNORE_VALUE, coco_segmentation_to_rle, encode_mask, rle_area, union_rle

MAX_CLASSES_PER_IMAGE = 3

ADE20K_SPLITS = {"train": "training", "val": "validation", "test": "testing"}
COCOSTUFF_SPLITS = {"train": "train2017", "val": "val2017"}
MAPILLARY_SPLITS = {"train": "training", "val": "validation"}
PACO_SPLITS = {"train": "paco_lvis_v1_train.json", "val": "paco_lvis_v1_val.json", "test": "paco_lvis_v1_test.json"}
PASCAL_PART_SPLITS = {"train": "train.json", "val": "val.json"}


def _split_entry(table: dict[str, str], dataset: str, split: str) -> str:
    if split not in table:
        raise ManifestError(f"unknown split {split!r} for {dataset}; expected one of {', '.join(table)}")
    return table[split]


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def sample_classes(present: Sequence[int], rng: np.random.Generator, max_classes: int) -> list[int]:
    """Up to ``max_classes`` distinct entries of ``present``, sorted (all of them if fewer)."""
    present = sorted(present)
    if len(present) <= max_classes:
        return present
    picked = rng.choice(len(present), size=max_classes, replace=False)
    return sorted(present[int(i)] for i in picked)


# --------------------------------------------------------------------------- label-map sets


@dataclass(frozen=True, slots=True)
class _LabelMapItem:
    image_id: str
    image_path: Path
    label_path: Path


def _ade20k_remap(label: np.ndarray, num_classes: int) -> np.ndarray:
    # LISA: 0 -> 255, then minus 1, then 254 (was 255) -> 255.
    out = label.astype(np.int32) - 1
    out[(label == 0) | (label == 255) | (out >= num_classes)] = IGNORE_VALUE
    return out.astype(np.uint8)


def _make_value_remap(names: Sequence[str], ignored: Callable[[str], bool]) -> Callable[[np.ndarray, int], np.ndarray]:
    lut = np.full(256, IGNORE_VALUE, dtype=np.uint8)
    for i, name in enumerate(names[:255]):
        if not ignored(name):
            lut[i] = i

    def remap(label: np.ndarray, num_classes: int) -> np.ndarray:
        if label.dtype != np.uint8:  # 16-bit maps: anything past 255 is out of range
            label = np.where(label > 255, IGNORE_VALUE, label).astype(np.uint8)
        return lut[label]

    return remap


def _label_map_rows(
    item: _LabelMapItem,
    *,
    dataset: str,
    split: str,
    classes: Sequence[str],
    remap: Callable[[np.ndarray, int], np.ndarray],
    seed: int,
    max_classes: int,
) -> tuple[list[QueryRow], Skipped | None]:
    try:
        with Image.open(item.label_path) as im:
            problem = size_problem(im.height, im.width)  # from the header, before decoding
            raw = np.array(im) if problem is None else None
    except Exception as e:
        return [], Skipped(str(item.label_path), f"unreadable label map ({type(e).__name__}: {e})")
    if raw is None:
        return [], Skipped(str(item.label_path), f"label map {problem}")
    if raw.ndim != 2:
        return [], Skipped(str(item.label_path), f"label map is not single-channel (shape {raw.shape})")
    label = remap(raw, len(classes))
    present = [int(v) for v in np.unique(label) if v != IGNORE_VALUE]
    if not present:
        return [], Skipped(str(item.label_path), "no labelled class")
    rng = stable_rng(seed, dataset, split, item.image_id)
    chosen = sample_classes(present, rng, max_classes)
    height, width = label.shape
    ignore = label == IGNORE_VALUE
    ignore_rle = encode_mask(ignore) if ignore.any() else None
    rows = [
        QueryRow(
            dataset=dataset,
            task="semantic",
            split=split,
            image_id=item.image_id,
            image_path=absolute(item.image_path),
            text=classes[c],
            is_sentence=False,
            height=int(height),
            width=int(width),
            mask_rle=encode_mask(label == c),
            ignore_rle=ignore_rle,
            source_id=f"{c}:{classes[c]}",
        )
        for c in chosen
    ]
    return rows, None


def _label_map_table(
    items: list[_LabelMapItem],
    skipped: list[Skipped],
    **kwargs: Any,
) -> pa.Table:
    rows: list[QueryRow] = []
    with ThreadPoolExecutor(max_workers=_workers()) as pool:  # PNG decoding releases the GIL
        for item_rows, skip in pool.map(lambda it: _label_map_rows(it, **kwargs), items):
            rows.extend(item_rows)
            if skip is not None:
                skipped.append(skip)
    return rows_to_table(rows, skipped=skipped)


def load_ade20k(
    data_root: str | Path,
    split: str = "train",
    *,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    dataset: str = "ade20k",
    max_classes: int = MAX_CLASSES_PER_IMAGE,
) -> pa.Table:
    """Manifest of ADE20K (SceneParsing, LISA layout) ``split`` (``train``/``val``; ``test`` = ``testing``).

    ``class_names`` replaces the 150 ADE20K names (label value ``v`` ->
    ``class_names[v - 1]``); the synthetic set uses it with its own classes.
    """
    sub = _split_entry(ADE20K_SPLITS, dataset, split)
    root = Path(data_root) / "ade20k"
    image_dir = require_path(root / "images" / sub, dataset, is_dir=True)
    label_dir = require_path(root / "annotations" / sub, dataset, is_dir=True)
    items, skipped = [], []
    for jpg in sorted(p for p in image_dir.iterdir() if p.name.endswith(".jpg")):
        png = label_dir / f"{jpg.stem}.png"
        if png.is_file():
            items.append(_LabelMapItem(jpg.stem, jpg, png))
        else:
            skipped.append(Skipped(str(jpg), f"no annotation {png.name}"))
    classes = tuple(class_names) if class_names is not None else ADE20K_CLASSES
    return _label_map_table(
        items, skipped, dataset=dataset, split=split, classes=classes, remap=_ade20k_remap, seed=seed,
        max_classes=max_classes,
    )  # fmt: skip


def load_cocostuff(
    data_root: str | Path, split: str = "train", *, seed: int = 0, max_classes: int = MAX_CLASSES_PER_IMAGE
) -> pa.Table:
    """Manifest of COCO-Stuff (164k ``stuffthingmaps``) ``split``; images from ``coco/<split>2017``."""
    sub = _split_entry(COCOSTUFF_SPLITS, "cocostuff", split)
    label_dir = require_path(Path(data_root) / "cocostuff" / sub, "cocostuff", is_dir=True)
    image_dir = require_path(Path(data_root) / "coco" / sub, "cocostuff images", is_dir=True)
    items, skipped = [], []
    for png in sorted(label_dir.glob("*.png")):
        jpg = image_dir / f"{png.stem}.jpg"
        if jpg.is_file():
            items.append(_LabelMapItem(png.stem, jpg, png))
        else:
            skipped.append(Skipped(str(png), f"no image {jpg}"))
    remap = _make_value_remap(COCOSTUFF_CLASSES, lambda name: "-" in name)
    return _label_map_table(
        items, skipped, dataset="cocostuff", split=split, classes=COCOSTUFF_CLASSES, remap=remap, seed=seed,
        max_classes=max_classes,
    )  # fmt: skip


def load_mapillary(
    data_root: str | Path, split: str = "train", *, seed: int = 0, max_classes: int = MAX_CLASSES_PER_IMAGE
) -> pa.Table:
    """Manifest of Mapillary Vistas v2.0 ``split`` (class names from ``config_v2.0.json``)."""
    sub = _split_entry(MAPILLARY_SPLITS, "mapillary", split)
    root = Path(data_root) / "mapillary"
    config = require_path(root / "config_v2.0.json", "mapillary", is_dir=False)
    with open(config, encoding="utf-8") as f:
        classes = tuple(str(lab["readable"]).lower() for lab in json.load(f)["labels"])
    label_dir = require_path(root / sub / "v2.0" / "labels", "mapillary", is_dir=True)
    image_dir = require_path(root / sub / "images", "mapillary images", is_dir=True)
    items, skipped = [], []
    for png in sorted(label_dir.glob("*.png")):
        jpg = image_dir / f"{png.stem}.jpg"
        if jpg.is_file():
            items.append(_LabelMapItem(png.stem, jpg, png))
        else:
            skipped.append(Skipped(str(png), f"no image {jpg}"))
    remap = _make_value_remap(classes, lambda name: name == "unlabeled")
    return _label_map_table(
        items, skipped, dataset="mapillary", split=split, classes=classes, remap=remap, seed=seed,
        max_classes=max_classes,
    )  # fmt: skip


# --------------------------------------------------------------------------- COCO-format part sets


def _strip_sense(name: str) -> str:
    # LVIS disambiguates with a suffix, e.g. "bow_(weapon)"; LISA keeps what precedes it
    return name.split("_(")[0]


def _paco_name(raw: str) -> str | tuple[str, str]:
    parts = raw.strip().split(":")
    if len(parts) == 1:
        return _strip_sense(parts[0])
    if len(parts) != 2:
        raise ManifestError(f"paco_lvis: unexpected category name {raw!r}")
    return _strip_sense(parts[0]), _strip_sense(parts[1])


def _pascal_part_name(raw: str) -> tuple[str, str]:
    parts = raw.strip().split(":")
    if len(parts) != 2:
        raise ManifestError(f"pascal_part: unexpected category name {raw!r}")
    return parts[0], parts[1]


def _part_text(name: str | tuple[str, str], rng: np.random.Generator) -> str:
    if isinstance(name, str):
        return name
    obj, part = name
    return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"


def _coco_parts_table(
    annotation_file: Path,
    image_dir: Path,
    *,
    dataset: str,
    split: str,
    namer: Callable[[str], str | tuple[str, str]],
    seed: int,
    max_classes: int,
) -> pa.Table:
    with open(annotation_file, "rb") as f:
        coco = json.load(f)
    names = {cat["id"]: namer(cat["name"]) for cat in coco.get("categories", [])}
    anns_by_image: dict[Any, dict[int, list[dict[str, Any]]]] = {}
    for ann in coco.get("annotations", []):
        anns_by_image.setdefault(ann["image_id"], {}).setdefault(ann["category_id"], []).append(ann)
    rows: list[QueryRow] = []
    skipped: list[Skipped] = []
    for img in sorted(coco.get("images", []), key=lambda im: im["id"]):
        by_cat = anns_by_image.get(img["id"])
        if not by_cat:
            continue  # images without annotations give no query (LISA redraws another image)
        image_id = str(img["id"])
        try:
            image_path = path_inside(image_dir, img.get("file_name"))
        except UnsafePathError as e:
            skipped.append(Skipped(f"{annotation_file}#image:{image_id}", str(e)))
            continue
        problem = declared_size_problem(image_path, img.get("height"), img.get("width"))
        if problem is not None:
            skipped.append(Skipped(str(image_path), problem))
            continue
        height, width = int(img["height"]), int(img["width"])
        rng = stable_rng(seed, dataset, split, image_id)
        for cat_id in sample_classes(list(by_cat), rng, max_classes):
            try:
                parts = [coco_segmentation_to_rle(a.get("segmentation", []), height, width) for a in by_cat[cat_id]]
            except ValueError as e:
                skipped.append(Skipped(f"{annotation_file}#image:{image_id}/category:{cat_id}", str(e)))
                continue
            mask_rle = union_rle(parts, height, width)
            if rle_area(mask_rle, height, width) == 0:
                continue
            rows.append(
                QueryRow(
                    dataset=dataset,
                    task="semantic",
                    split=split,
                    image_id=image_id,
                    image_path=absolute(image_path),
                    text=_part_text(names[cat_id], rng),
                    is_sentence=False,
                    height=height,
                    width=width,
                    mask_rle=mask_rle,
                    ignore_rle=None,
                    source_id=f"category:{cat_id}",
                )
            )
    return rows_to_table(rows, skipped=skipped)


def load_paco_lvis(
    data_root: str | Path, split: str = "train", *, seed: int = 0, max_classes: int = MAX_CLASSES_PER_IMAGE
) -> pa.Table:
    """Manifest of PACO-LVIS ``split`` (objects and object parts, on COCO 2017 images)."""
    fname = _split_entry(PACO_SPLITS, "paco_lvis", split)
    ann_file = require_path(Path(data_root) / "vlpart" / "paco" / "annotations" / fname, "paco_lvis", is_dir=False)
    image_dir = require_path(Path(data_root) / "coco", "paco_lvis images", is_dir=True)
    return _coco_parts_table(
        ann_file, image_dir, dataset="paco_lvis", split=split, namer=_paco_name, seed=seed, max_classes=max_classes
    )


def load_pascal_part(
    data_root: str | Path, split: str = "train", *, seed: int = 0, max_classes: int = MAX_CLASSES_PER_IMAGE
) -> pa.Table:
    """Manifest of PASCAL-Part ``split`` (object parts on VOC2010 images)."""
    fname = _split_entry(PASCAL_PART_SPLITS, "pascal_part", split)
    root = Path(data_root) / "vlpart" / "pascal_part"
    ann_file = require_path(root / fname, "pascal_part", is_dir=False)
    image_dir = require_path(root / "VOCdevkit" / "VOC2010" / "JPEGImages", "pascal_part images", is_dir=True)
    return _coco_parts_table(
        ann_file, image_dir, dataset="pascal_part", split=split, namer=_pascal_part_name, seed=seed,
        max_classes=max_classes,
    )  # fmt: skip
