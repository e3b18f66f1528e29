"""Scenes of the synthetic dataset: shape polygons, textured backgrounds, exact masks.

:func:`make_scene` draws one image of 2-5 non-overlapping shapes (:data:`SHAPE_KINDS` in
:data:`COLOURS`, small or big) on a noisy, textured background. Each shape's polygon is
rasterised first (with the rule its format's reader uses) and the image is painted through
that mask, so the masks are exact. Everything is a pure function of the generator passed in.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..rle import RasterRule, polygons_to_mask

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
