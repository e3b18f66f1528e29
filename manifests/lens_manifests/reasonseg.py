"""ReasonSeg (LISA) adapter: ``reason_seg/ReasonSeg/{train,val,test}/NAME.jpg + NAME.json``.

Each JSON (LabelMe style) holds ``text`` (phrasings of one query), ``is_sentence``
(long sentence vs short phrase) and ``shapes`` (``{label, points}`` polygons).
The mask follows LISA's ``get_mask_from_json`` rule exactly:

* shapes labelled ``flag`` (any case) are dropped;
* polygons are drawn largest first (area = pixel count of the polygon drawn
  alone, order = ``np.argsort(areas)[::-1]``), so smaller shapes drawn later win;
* a label containing ``ignore`` paints 255, any other label paints 1;
* drawing = ``cv2.polylines`` + ``cv2.fillPoly`` on int-truncated points,
  reproduced without OpenCV by :mod:`.raster`.

Rows: evaluation splits (val/test) give one query per image from ``text[0]``
(what LISA evaluates); the train split gives one query per phrasing. Image
height/width come from the JPEG header (EXIF orientation applied, as
``cv2.imread`` and LabelMe both apply it); the pixels are not decoded. An
image whose header cannot be read, whose size exceeds ``LENS_MAX_IMAGE_SIDE``
(:func:`~.common.max_image_side`), whose JSON is missing or has no text, or
whose polygons have NaN/infinite points is skipped and reported (see
:mod:`.common`); the rest goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from .common import (
    ManifestError,
    QueryRow,
    Skipped,
    absolute,
    image_header,
    require_path,
    rows_to_table,
    shown_path,
    size_problem,
    utf8_name,
)
from .raster import draw_polygon_cv2
from .rle import IGNORE_VALUE, encode_mask

REASONSEG_SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")

def read_reasonseg_json(path: Path) -> dict[str, Any]:
    """Parse one ReasonSeg JSON (UTF-8, falling back to cp1252 as LISA does)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return json.loads(path.read_text(encoding="cp1252"))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as displayed, from its header only.

    PIL's ``open`` is lazy (no pixel decoding); the EXIF orientation tag is
    applied because LISA's ``cv2.imread`` applies it and the polygons were
    drawn on the oriented image.
    """
    return image_header(path)[1]


def _drawn_alone(points: Any, height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """One polygon drawn alone, kept as its bounding box: ``(where, bool crop)``.

    Only one full-size scratch map exists at a time, so many shapes on a large image
    cost their boxes, not a full map each.
    """
    alone = np.zeros((height, width), dtype=np.uint8)
    draw_polygon_cv2(alone, points, 1)
    rows, cols = np.flatnonzero(alone.any(axis=1)), np.flatnonzero(alone.any(axis=0))
    if rows.size == 0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), dtype=bool)
    where = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    return where, alone[where].astype(bool)


def label_map_from_shapes(shapes: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """uint8 (H, W) map with 1 = target, 255 = ignore, 0 = rest, by LISA's rule (module doc).

    Raises:
        ValueError: a polygon has a point that is not a finite number (the image is skipped).
    """
    kept: list[tuple[int, tuple[slice, slice], np.ndarray]] = []
    areas: list[int] = []
    for shape in shapes:
        label = str(shape.get("label", ""))
        if label.lower() == "flag":  # deprecated, meaningless annotations in ReasonSeg
            continue
        value = IGNORE_VALUE if "ignore" in label.lower() else 1
        where, crop = _drawn_alone(shape.get("points", []), height, width)
        kept.append((value, where, crop))
        areas.append(int(crop.sum()))
    out = np.zeros((height, width), dtype=np.uint8)
    # Same call as LISA (quicksort-based argsort, reversed) so equal areas tie the same way.
    for idx in np.argsort(np.asarray(areas, dtype=np.int64))[::-1]:
        value, where, crop = kept[int(idx)]
        out[where][crop] = value
    return out


def _shapes(anno: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``shapes`` of an annotation; ValueError when it is not a list of objects."""
    shapes = anno.get("shapes", [])
    if not isinstance(shapes, list) or not all(isinstance(shape, dict) for shape in shapes):
        raise ValueError("'shapes' is not a list of objects")
    return shapes


def load_reasonseg(
    data_root: str | Path,
    split: str,
    *,
    dataset: str = "reasonseg",
    folder: str = "ReasonSeg",
) -> pa.Table:
    """Manifest of ReasonSeg ``split`` under ``<data_root>/reason_seg/<folder>/<split>/``.

    ``dataset`` names the rows (the synthetic set reuses this reader).
    """
    if split not in REASONSEG_SPLITS:
        raise ManifestError(f"unknown ReasonSeg split {split!r}; expected one of {', '.join(REASONSEG_SPLITS)}")
    split_dir = require_path(Path(data_root) / "reason_seg" / folder / split, f"{dataset}:{split}", is_dir=True)
    rows: list[QueryRow] = []
    skipped: list[Skipped] = []
    for jpg in sorted(split_dir.glob("*.jpg")):
        if not utf8_name(jpg):
            # a manifest (Parquet) holds text: this image cannot be named in it, the others can
            skipped.append(Skipped(shown_path(jpg), "its file name is not valid UTF-8: rename the image and its json"))
            continue
        json_path = jpg.with_suffix(".json")
        if not json_path.is_file():
            skipped.append(Skipped(str(jpg), "no annotation json beside the image"))
            continue
        try:
            anno = read_reasonseg_json(json_path)
        except (OSError, ValueError) as e:
            skipped.append(Skipped(str(json_path), f"unreadable json ({e})"))
            continue
        if not isinstance(anno, dict):
            skipped.append(Skipped(str(json_path), "the json is not an object"))
            continue
        texts = anno.get("text", [])
        texts = [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []
        # keep each phrasing's index in the file: it names the query (source_id)
        texts = [(k, t.strip()) for k, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        if not texts:
            skipped.append(Skipped(str(json_path), "no query text"))
            continue
        try:
            height, width = image_size(jpg)
        except Exception as e:
            skipped.append(Skipped(str(jpg), f"unreadable image header ({type(e).__name__}: {e})"))
            continue
        problem = size_problem(height, width)
        if problem is not None:
            skipped.append(Skipped(str(jpg), f"image {problem}"))
            continue
        try:
            label = label_map_from_shapes(_shapes(anno), height, width)
        except ValueError as e:
            skipped.append(Skipped(str(json_path), f"unusable shapes ({e})"))
            continue
        mask_rle = encode_mask(label == 1)
        ignore = label == IGNORE_VALUE
        ignore_rle = encode_mask(ignore) if ignore.any() else None
        is_sentence = bool(anno.get("is_sentence", False))
        chosen = texts[:1] if split in EVAL_SPLITS else texts
        for k, text in chosen:
            rows.append(
                QueryRow(
                    dataset=dataset,
                    task="reasoning",
                    split=split,
                    image_id=jpg.stem,
                    image_path=absolute(jpg),
                    text=text,
                    is_sentence=is_sentence,
                    height=height,
                    width=width,
                    mask_rle=mask_rle,
                    ignore_rle=ignore_rle,
                    source_id=f"{jpg.stem}/text:{k}",
                )
            )
    return rows_to_table(rows, skipped=skipped)
