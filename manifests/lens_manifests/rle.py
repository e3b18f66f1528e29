"""Masks in the manifest: COCO compressed RLE strings, and how to get them back.

A manifest row stores its target as the ``counts`` string of a COCO compressed
RLE (``mask_rle``) plus, where a dataset marks pixels "do not score", a second
RLE of that ignore region (``ignore_rle``). Both share the row's height and
width. :func:`decode_target` turns a row back into the uint8 label map every
metric and loss uses: 0 background, 1 target, 255 ignore (ignore wins).

Two polygon rasterisation rules exist in the source datasets and both are
kept, because each dataset's masks are defined by the rule its authors used:

* ``"cv2"``: LISA's ReasonSeg rule (``cv2.polylines`` + ``cv2.fillPoly`` on
  int-truncated points), reproduced in numpy by :mod:`.raster`;
* ``"coco"``: ``pycocotools.mask.frPyObjects``, the rule of every COCO-format
  ``instances.json`` (RefCOCO & co., PACO-LVIS, PASCAL-Part).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from .raster import draw_polygon_cv2, finite_points

#: value of ignored pixels in a decoded target (LISA's ``ignore_label``)
IGNORE_VALUE = 255

RasterRule = Literal["cv2", "coco"]


@contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    """Silence the harmless numpy-2 deprecation warnings pycocotools emits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _rle_dict(counts: str | bytes, height: int, width: int) -> dict[str, Any]:
    return {"size": [int(height), int(width)], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def encode_mask(mask: np.ndarray) -> str:
    """COCO compressed RLE ``counts`` (ASCII str) of a boolean (H, W) mask."""
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects a 2-D (H, W) mask, got shape {mask.shape}")
    with _quiet_pycocotools():
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return rle["counts"].decode("ascii")


def empty_rle(height: int, width: int) -> str:
    """Compressed RLE ``counts`` of an all-zero (H, W) mask, built from its one run (no raster)."""
    with _quiet_pycocotools():
        rle = mask_utils.frPyObjects({"size": [int(height), int(width)], "counts": [int(height) * int(width)]},
                                     int(height), int(width))
    return rle["counts"].decode("ascii")


def decode_rle(counts: str | bytes, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask from a COCO compressed RLE ``counts`` string."""
    with _quiet_pycocotools():
        m = mask_utils.decode(_rle_dict(counts, height, width))
    return m.astype(bool)


def rle_area(counts: str | bytes, height: int, width: int) -> int:
    """Number of foreground pixels of a compressed RLE, without decoding it."""
    with _quiet_pycocotools():
        return int(mask_utils.area(_rle_dict(counts, height, width)))


def polygons_to_mask(
    polygons: Sequence[Sequence[Sequence[float]]] | Sequence[np.ndarray],
    height: int,
    width: int,
    *,
    rule: RasterRule = "cv2",
) -> np.ndarray:
    """Union of polygons as a boolean (H, W) mask.

    Each polygon is a sequence of ``(x, y)`` points. ``rule="cv2"`` fills like
    LISA's ``cv2.polylines`` + ``cv2.fillPoly`` (boundary pixels included,
    points truncated to int); ``rule="coco"`` like ``pycocotools``'
    ``frPyObjects`` (the rule behind COCO polygon annotations). Polygons with
    fewer than 3 points are skipped under ``"coco"`` (pycocotools would read a
    4-number list as a box).
    """
    if rule == "cv2":
        out = np.zeros((height, width), dtype=np.uint8)
        for poly in polygons:
            draw_polygon_cv2(out, poly, 1)
        return out.astype(bool)
    if rule == "coco":
        flat = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in polygons]
        counts = coco_segmentation_to_rle(flat, height, width)
        return decode_rle(counts, height, width)
    raise ValueError(f"unknown rasterisation rule {rule!r}; expected 'cv2' or 'coco'")


def _one_coco_rle(seg: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
    counts = seg["counts"]
    size = [int(v) for v in seg.get("size", (height, width))]
    if isinstance(counts, list):  # uncompressed RLE: run lengths as ints
        with _quiet_pycocotools():
            return mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def coco_segmentation_to_rle(segmentation: Any, height: int, width: int) -> str:
    """Compressed RLE ``counts`` of a COCO ``segmentation`` field (union of its parts).

    Accepts every form found in COCO-style annotation files: a list of
    polygons (flat ``[x0, y0, x1, y1, ...]`` lists), a list of RLE dicts, or a
    single RLE dict, where an RLE's ``counts`` is a compressed string/bytes or
    an uncompressed list of run lengths. An empty list gives an empty mask.
    Multiple parts are merged (LISA sums them and uses ``> 0``; same pixels).
    """
    rles: list[dict[str, Any]] = []
    if isinstance(segmentation, Mapping):
        rles.append(_one_coco_rle(segmentation, height, width))
    elif isinstance(segmentation, Sequence) and not isinstance(segmentation, str | bytes):
        polys = []
        for part in segmentation:
            if isinstance(part, Mapping):
                rles.append(_one_coco_rle(part, height, width))
            elif len(part) >= 6:  # at least three points; shorter lists have no area
                polys.append(finite_points(part).reshape(-1).tolist())
        if polys:
            with _quiet_pycocotools():
                rles.extend(mask_utils.frPyObjects(polys, int(height), int(width)))
    else:
        raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    for r in rles:
        if [int(v) for v in r["size"]] != [int(height), int(width)]:
            raise ValueError(f"RLE of size {list(r['size'])} does not match the image size {[height, width]}")
    if not rles:
        return empty_rle(height, width)
    with _quiet_pycocotools():
        merged = rles[0] if len(rles) == 1 else mask_utils.merge(rles, intersect=False)
    counts = merged["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)


def union_rle(counts: Sequence[str], height: int, width: int) -> str:
    """Compressed RLE of the union of several compressed RLEs of the same size."""
    if not counts:
        return empty_rle(height, width)
    if len(counts) == 1:
        return counts[0]
    with _quiet_pycocotools():
        merged = mask_utils.merge([_rle_dict(c, height, width) for c in counts], intersect=False)
    return merged["counts"].decode("ascii")


def decode_target(source: Mapping[str, Any] | pa.Table, index: int | None = None) -> np.ndarray:
    """uint8 (H, W) label map of one query: 1 target, 0 background, 255 ignore.

    ``source`` is either a mapping with ``mask_rle``, ``ignore_rle`` (may be
    None/absent), ``height`` and ``width`` (e.g. one row of
    ``table.to_pylist()``), or a manifest table together with a row ``index``.
    Ignore wins over target where both are set.
    """
    if isinstance(source, pa.Table):
        if index is None:
            raise ValueError("decode_target(table, index): a row index is needed with a table")
        if not 0 <= index < source.num_rows:
            raise IndexError(f"row {index} out of range for a manifest of {source.num_rows} rows")
        fields: Mapping[str, Any] = {
            name: source.column(name)[index].as_py() for name in ("mask_rle", "ignore_rle", "height", "width")
        }
    else:
        fields = source
    height, width = int(fields["height"]), int(fields["width"])
    out = decode_rle(fields["mask_rle"], height, width).astype(np.uint8)
    ignore = fields.get("ignore_rle")
    if ignore:
        out[decode_rle(ignore, height, width)] = IGNORE_VALUE
    return out
