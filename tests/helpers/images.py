"""Test images of the backbone tests: random RGB noise, and two non-square ones in SAM's padded square."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def padded_squares() -> list[Image.Image]:
    """Two non-square images (300x500, 640x480) brought into SAM's padded square, as the extractor feeds the MLLM."""
    from lens_cache.backbones.geometry import sam_frame

    return [sam_frame(random_image(0, 300, 500)).padded_image(), sam_frame(random_image(1, 640, 480)).padded_image()]
