"""The project's own dataset: coloured shapes, written in the real dataset formats.

:func:`write_synthetic` draws images of 2-5 shapes (circle, square, triangle,
star, hexagon; red, green, blue, yellow, purple, orange; small or big) on a
noisy, textured background and writes three sets that the *real* adapters read:

* ``reason_seg/ReasonSeg/{train,val,test}/NAME.jpg + NAME.json`` -- one query per
  image with 2-3 phrasings: reasoning sentences ("the shape that has three
  corners", "the object with the same colour as a ripe banana", "the largest
  shape in the picture") or short phrases (``is_sentence`` False, e.g. "the
  red circle", "the blue shapes"). Near-ties (e.g. a second shape almost as
  large) are marked ``ignore``; a few meaningless ``flag`` shapes are added,
  as in the real ReasonSeg files.
* ``refer_seg/synthref/refs(unc).p + instances.json`` with images in
  ``refer_seg/images/synthref/`` -- every shape that some phrase picks out
  uniquely is a ref with 1-3 sentences ("the red circle", "the big blue
  square on the left", "the leftmost shape"); splits train/val/testA/testB.
* ``ade20k/images/{training,validation,testing}/*.jpg`` + ``ade20k/annotations/...png``
  -- ADE20K-format label maps over :data:`SYNTHETIC_CLASSES` (value ``i + 1`` is
  class ``i``; value 0, the 1-pixel rim around each shape, is ignored), with the
  class list in ``ade20k/synthetic_classes.json``.

Masks are exact: each shape's polygon is rasterised first (with the rule its
format's reader uses: OpenCV-style for ReasonSeg/ADE, pycocotools for REFER)
and the image is painted through that mask. Everything is a pure function of
the seed and the counts; every image has its own generator, seeded from
``(seed, set, split, index)``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .common import ManifestError
from .rle import RasterRule, polygons_to_mask

GENERATOR_VERSION = 1
MARKER = "SYNTHETIC_DONE.json"
REFER_NAME = "synthref"
JPEG_QUALITY = 95

SHAPE_KINDS = ("circle", "square", "triangle", "star", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 55, 175),
    "orange": (240, 135, 25),
}
#: semantic classes of the ADE20K-format set; label value ``i + 1`` is class ``i``
SYNTHETIC_CLASSES = ("background", *SHAPE_KINDS)

DEFAULT_NUM_TRAIN = 200
DEFAULT_NUM_VAL = 40
DEFAULT_NUM_TEST = 40

# ----------------------------------------------------------------------------- phrasing

#: reasoning clues for a shape kind: (relative clause, full phrasings)
KIND_CLUES: dict[str, tuple[str, tuple[str, ...]]] = {
    "circle": (
        "is perfectly round",
        ("the round shape without any corners", "the shape that could roll like a wheel",
         "the shape as round as a coin"),
    ),
    "square": (
        "has four equal sides",
        ("the shape with four equal sides and four right angles", "the shape that looks like a floor tile",
         "the shape with four corners that are all right angles"),
    ),
    "triangle": (
        "has three corners",
        ("the shape that has three corners", "the shape with exactly three straight sides",
         "which shape in the picture is made of three straight edges?"),
    ),
    "star": (
        "has five pointed tips",
        ("the shape that looks like a star in the night sky", "the shape with five pointed tips",
         "the shape you might put on top of a christmas tree"),
    ),
    "hexagon": (
        "has six corners",
        ("the shape with six corners", "the shape like a single cell of a honeycomb",
         "the shape that has six equal sides"),
    ),
}  # fmt: skip

#: reasoning clues for a colour: (relative clause, full phrasings)
COLOUR_CLUES: dict[str, tuple[str, tuple[str, ...]]] = {
    "red": (
        "has the colour of a ripe tomato",
        ("the shape with the colour of a ripe tomato", "the shape coloured like a fire engine",
         "the object that has the colour of a strawberry"),
    ),
    "green": (
        "has the colour of fresh grass",
        ("the shape with the colour of fresh grass", "the shape coloured like a frog",
         "the object that has the colour of a lime"),
    ),
    "blue": (
        "has the colour of a clear sky",
        ("the shape with the colour of a clear sky", "the shape coloured like the deep sea",
         "the object that has the colour of blueberries"),
    ),
    "yellow": (
        "has the same colour as a ripe banana",
        ("the object with the same colour as a ripe banana", "the shape coloured like a lemon",
         "the shape that has the colour of sunflower petals"),
    ),
    "purple": (
        "has the colour of lavender flowers",
        ("the shape with the colour of lavender flowers", "the shape coloured like a ripe plum",
         "the object that has the colour of grape juice"),
    ),
    "orange": (
        "has the colour of a pumpkin",
        ("the shape coloured like a carrot", "the shape with the colour of a pumpkin",
         "the object with the same colour as a tangerine"),
    ),
}  # fmt: skip

EXTREME_PHRASES: dict[str, tuple[str, ...]] = {
    "largest": ("the largest shape in the picture", "the biggest object in this image",
                "the shape that takes up the most space"),
    "smallest": ("the smallest shape in the picture", "the tiniest object in this image",
                 "the shape that takes up the least space"),
    "left": ("the shape closest to the left edge of the image", "the leftmost object in the picture"),
    "right": ("the shape closest to the right edge of the image", "the rightmost object in the picture"),
    "top": ("the shape nearest the top of the picture", "the highest object in the image"),
    "bottom": ("the shape nearest the bottom of the picture", "the lowest object in the image"),
}  # fmt: skip


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True, slots=True)
class Shape:
    """One drawn shape: attributes, integer polygon (N, 2) in (x, y), pixel mask and its stats."""

    kind: str
    colour: str
    size: str  # "small" | "big"
    polygon: np.ndarray
    mask: np.ndarray  # bool (H, W)
    area: int  # pixels in mask
    centre: tuple[float, float]  # (x, y) mean of the mask's pixels
    bbox: tuple[float, float, float, float]  # COCO (x, y, w, h) of the mask

    @classmethod
    def from_mask(cls, kind: str, colour: str, size: str, polygon: np.ndarray, mask: np.ndarray) -> Shape:
        # the shape lies inside its polygon's bounding box (+1 px for rounding): look only there
        x0, y0 = np.maximum(polygon.min(axis=0) - 1, 0)
        ys, xs = np.nonzero(mask[y0 : polygon[:, 1].max() + 2, x0 : polygon[:, 0].max() + 2])
        xs, ys = xs + x0, ys + y0
        bbox = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
        return cls(kind, colour, size, polygon, mask, int(xs.size), (float(xs.mean()), float(ys.mean())), bbox)


@dataclass(frozen=True, slots=True)
class Scene:
    """A rendered image (H, W, 3 uint8) and its shapes."""

    image: np.ndarray
    shapes: tuple[Shape, ...]

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Integer vertices (N, 2) of a ``kind`` with circumradius ``r`` turned by ``angle`` radians."""
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        radii = np.full_like(t, r)
    elif kind == "star":
        t = -math.pi / 2 + angle + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    else:
        n = {"square": 4, "triangle": 3, "hexagon": 6}[kind]
        base = {"square": math.pi / 4, "triangle": -math.pi / 2, "hexagon": 0.0}[kind]
        t = base + angle + np.arange(n) * 2 * math.pi / n
        radii = np.full_like(t, r)
    pts = np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)
    return np.rint(pts).astype(np.int64)


_MAX_SIDE = 320
_NOISE_SIDE = 2 * _MAX_SIDE


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """int16 (640, 640, 3) Gaussian noise (sigma 9), made once; images use random crops of it.

    Drawing fresh per-pixel noise for every image costs more than everything
    else together; a fixed bank cropped at seeded offsets is as good a texture.
    """
    bank = np.random.default_rng(20240229).standard_normal(size=(_NOISE_SIDE, _NOISE_SIDE, 3), dtype=np.float32)
    return np.rint(bank * 9).astype(np.int16)


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    y, x = (int(v) for v in rng.integers(0, _NOISE_SIDE - _MAX_SIDE + 1, size=2))
    return _noise_bank()[y : y + height, x : x + width]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """int16 (H, W, 3): muted base colour + smooth blobs + optional stripes + pixel noise."""
    base = rng.integers(90, 191, size=3).astype(np.int16)
    coarse = rng.normal(0, 28, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3))
    # blobs: a tiny random image upsampled smoothly (PIL does it in C)
    blobs = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    canvas = np.asarray(blobs, dtype=np.int16) + (base - 128)
    if rng.random() < 0.5:
        phase, freq = rng.uniform(0, 6.3), rng.uniform(0.05, 0.3)
        canvas += np.rint(10 * np.sin(np.arange(width) * freq + phase)).astype(np.int16)[None, :, None]
    canvas += _noise(rng, height, width)
    return canvas


def make_scene(
    rng: np.random.Generator,
    *,
    rule: RasterRule,
    num_shapes: int | None = None,
    kinds: tuple[str, ...] = SHAPE_KINDS,
    colours: tuple[str, ...] = tuple(COLOURS),
) -> Scene:
    """Draw one image (160-320 px a side) of non-overlapping shapes; masks rasterised with ``rule``."""
    height, width = (int(v) for v in rng.integers(160, _MAX_SIDE + 1, size=2))
    m = min(height, width)
    want = int(num_shapes if num_shapes is not None else rng.integers(2, 6))
    placed: list[tuple[float, float, float]] = []
    shapes: list[Shape] = []
    canvas = _background(rng, height, width)
    texture = _noise(rng, height, width) // 2  # finer grain on the shapes than on the background
    for _ in range(want):
        size = "big" if rng.random() < 0.45 else "small"
        r = m * (rng.uniform(0.15, 0.21) if size == "big" else rng.uniform(0.07, 0.10))
        for _attempt in range(40):
            cx = rng.uniform(r + 3, width - r - 3)
            cy = rng.uniform(r + 3, height - r - 3)
            if all(math.hypot(cx - px, cy - py) > r + pr + 4 for px, py, pr in placed):
                break
        else:
            continue  # no room left for this one
        placed.append((cx, cy, r))
        kind = str(rng.choice(kinds))
        colour = str(rng.choice(colours))
        angle = rng.uniform(-0.2, 0.2) if kind != "circle" else 0.0
        poly = shape_polygon(kind, cx, cy, r, angle)
        mask = polygons_to_mask([poly], height, width, rule=rule)
        paint = np.asarray(COLOURS[colour], dtype=np.int16) + rng.integers(-12, 13, size=3).astype(np.int16)
        # paint inside the polygon's bounding box only (+1 px for rounding): far cheaper
        (x0, y0), (x1, y1) = np.maximum(poly.min(axis=0) - 1, 0), poly.max(axis=0) + 2
        box, inside = (slice(y0, y1), slice(x0, x1)), mask[y0:y1, x0:x1]
        canvas[box][inside] = paint + texture[box][inside]
        shapes.append(Shape.from_mask(kind, colour, size, poly, mask))
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return Scene(image, tuple(shapes))


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, quality=JPEG_QUALITY)


# ----------------------------------------------------------------------------- queries


def _unique(shapes: tuple[Shape, ...], pred: Callable[[Shape], bool]) -> int | None:
    hits = [i for i, s in enumerate(shapes) if pred(s)]
    return hits[0] if len(hits) == 1 else None


def _extreme(
    shapes: tuple[Shape, ...], key: Callable[[Shape], float], margin: float, near: float
) -> tuple[int, list[int]] | None:
    """``(index, ambiguous)``: the shape with the largest ``key`` and the runners-up closer to it
    than ``margin`` (to be ignored); None when even the second one is closer than ``near``."""
    if len(shapes) < 2:
        return None
    order = sorted(range(len(shapes)), key=lambda i: key(shapes[i]), reverse=True)
    lead = key(shapes[order[0]]) - key(shapes[order[1]])
    if lead < near:
        return None
    ambiguous = [i for i in order[1:] if key(shapes[order[0]]) - key(shapes[i]) < margin]
    return order[0], ambiguous


@dataclass(frozen=True, slots=True)
class ReasonQuery:
    """A ReasonSeg-style query: phrasings, target shapes, shapes to ignore."""

    texts: tuple[str, ...]
    is_sentence: bool
    targets: tuple[int, ...]
    ignores: tuple[int, ...] = ()


def reason_candidates(scene: Scene) -> list[ReasonQuery]:
    """Every query with a well-defined answer in ``scene``."""
    shapes, w, h = scene.shapes, scene.width, scene.height
    out: list[ReasonQuery] = []
    for kind, (_, phrases) in KIND_CLUES.items():
        i = _unique(shapes, lambda s, k=kind: s.kind == k)
        if i is not None:
            out.append(ReasonQuery(phrases, True, (i,)))
    for colour, (_, phrases) in COLOUR_CLUES.items():
        i = _unique(shapes, lambda s, c=colour: s.colour == c)
        if i is not None:
            out.append(ReasonQuery(phrases, True, (i,)))
    for i, s in enumerate(shapes):
        same_kind = sum(t.kind == s.kind for t in shapes)
        same_colour = sum(t.colour == s.colour for t in shapes)
        combo = sum(t.kind == s.kind and t.colour == s.colour for t in shapes)
        if combo == 1 and same_kind > 1 and same_colour > 1:  # only the pair of clues pins it down
            kc, cc = KIND_CLUES[s.kind][0], COLOUR_CLUES[s.colour][0]
            texts = (f"the shape that {kc} and {cc}", f"among all the shapes, the one that {kc} and {cc}")
            out.append(ReasonQuery(texts, True, (i,)))
    # (name, key, clear lead, minimal lead): a runner-up closer than the clear lead is
    # ignored; under the minimal lead the question has no answer. Areas compare by ratio.
    for name, key, margin, near in (
        ("largest", lambda s: math.log(s.area), math.log(1.3), math.log(1.1)),
        ("smallest", lambda s: -math.log(s.area), math.log(1.3), math.log(1.1)),
        ("left", lambda s: -s.centre[0], 0.12 * w, 0.05 * w),
        ("right", lambda s: s.centre[0], 0.12 * w, 0.05 * w),
        ("top", lambda s: -s.centre[1], 0.12 * h, 0.05 * h),
        ("bottom", lambda s: s.centre[1], 0.12 * h, 0.05 * h),
    ):
        found = _extreme(shapes, key, margin, near)
        if found is not None:
            out.append(ReasonQuery(EXTREME_PHRASES[name], True, (found[0],), tuple(found[1])))
    # short phrases (is_sentence False), including multi-object targets
    for i, s in enumerate(shapes):
        if sum(t.kind == s.kind and t.colour == s.colour for t in shapes) == 1:
            out.append(ReasonQuery((f"the {s.colour} {s.kind}", f"{s.colour} {s.kind}"), False, (i,)))
    for colour in COLOURS:
        hits = tuple(i for i, s in enumerate(shapes) if s.colour == colour)
        if len(hits) >= 2:
            out.append(ReasonQuery((f"the {colour} shapes", f"all {colour} shapes"), False, hits))
    for kind in SHAPE_KINDS:
        hits = tuple(i for i, s in enumerate(shapes) if s.kind == kind)
        if len(hits) >= 2:
            out.append(ReasonQuery((f"the {kind}s", f"every {kind}"), False, hits))
    return out


def refer_sentences(scene: Scene, i: int) -> list[str]:
    """Phrases that pick out shape ``i`` and no other in ``scene`` (REFER style), in a fixed order."""
    shapes, w, h = scene.shapes, scene.width, scene.height
    s = shapes[i]
    found: list[str] = []

    def only(pred: Callable[[Shape], bool], text: str) -> None:
        if _unique(shapes, pred) == i:
            found.append(text)

    only(lambda t: t.kind == s.kind, f"the {s.kind}")
    only(lambda t: t.colour == s.colour, f"the {s.colour} shape")
    only(lambda t: t.kind == s.kind and t.colour == s.colour, f"the {s.colour} {s.kind}")
    only(lambda t: t.kind == s.kind and t.size == s.size, f"the {s.size} {s.kind}")
    only(
        lambda t: t.kind == s.kind and t.colour == s.colour and t.size == s.size,
        f"the {s.size} {s.colour} {s.kind}",
    )
    # "on the left/right", "at the top/bottom" within a group of two lookalikes
    for label, group in ((f"{s.kind}", lambda t: t.kind == s.kind),
                         (f"{s.colour} {s.kind}", lambda t: t.kind == s.kind and t.colour == s.colour),
                         (f"{s.size} {s.colour} {s.kind}",
                          lambda t: t.kind == s.kind and t.colour == s.colour and t.size == s.size)):  # fmt: skip
        members = [j for j, t in enumerate(shapes) if group(t)]
        if len(members) != 2:
            continue
        other = shapes[members[0] if members[1] == i else members[1]]
        dx, dy = s.centre[0] - other.centre[0], s.centre[1] - other.centre[1]
        if abs(dx) > 0.15 * w:
            found.append(f"the {label} on the {'left' if dx < 0 else 'right'}")
        if abs(dy) > 0.15 * h:
            found.append(f"the {label} at the {'top' if dy < 0 else 'bottom'}")
    for name, key, margin in (
        ("the leftmost shape", lambda t: -t.centre[0], 0.1 * w),
        ("the rightmost shape", lambda t: t.centre[0], 0.1 * w),
        ("the shape at the very top", lambda t: -t.centre[1], 0.1 * h),
        ("the lowest shape", lambda t: t.centre[1], 0.1 * h),
        ("the biggest shape", lambda t: math.log(t.area), math.log(1.3)),
        ("the smallest shape", lambda t: -math.log(t.area), math.log(1.3)),
    ):
        hit = _extreme(shapes, key, margin, margin)
        if hit is not None and hit[0] == i:
            found.append(name)
    return list(dict.fromkeys(found))  # de-duplicated, order kept


# ----------------------------------------------------------------------------- writers

_SET_CODES = {"reason": 1, "refer": 2, "sem": 3}
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "testA": 4, "testB": 5}
_ADE_SUBDIRS = {"train": "training", "val": "validation", "test": "testing"}


def _item_rng(seed: int, set_name: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SET_CODES[set_name], _SPLIT_CODES[split], int(index)])


def _render_reason(root: Path, split: str, index: int, seed: int) -> int:
    """Write one ReasonSeg-format image + json; returns the number of queries it yields."""
    out_dir = root / "reason_seg" / "ReasonSeg" / split
    rng = _item_rng(seed, "reason", split, index)
    while True:  # a scene nearly always has a candidate; the loop guards the rare empty one
        scene = make_scene(rng, rule="cv2")
        candidates = reason_candidates(scene)
        if candidates:
            break
    sentences = [q for q in candidates if q.is_sentence]
    phrases = [q for q in candidates if not q.is_sentence]
    pool = phrases if phrases and (rng.random() < 0.2 or not sentences) else sentences
    query = pool[int(rng.integers(len(pool)))]
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
    # half of the scenes draw from few kinds/colours, so lookalikes (and "on the left") occur
    kinds = tuple(str(k) for k in rng.choice(SHAPE_KINDS, size=2, replace=False)) if rng.random() < 0.5 else SHAPE_KINDS
    colours = tuple(str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)) if rng.random() < 0.5 else None
    scene = make_scene(rng, rule="coco", kinds=kinds, colours=colours or tuple(COLOURS))
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
