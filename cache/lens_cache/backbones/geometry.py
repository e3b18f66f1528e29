"""SAM's image frame, shared by both backbones.

SAM sees the image resized so its longest side is 1024 (``ResizeLongestSide``, with
its exact rounding and resampling), normalised by ``Sam.preprocess`` and zero-padded
right/bottom to 1024 x 1024. LLaVA is fed the SAME padded square, unnormalised RGB
with black (zero) padding as in the official LENS code, which its image processor
resizes to 336; the 24 x 24 token grid is then aligned with SAM's padded frame, so
grid cell (x, y) maps to SAM pixels ``(x + 0.5) * 1024 / 24``.

Note the two paddings differ on purpose: SAM pads *after* normalisation (``Sam.preprocess``),
LLaVA's square is padded in pixel space (black).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from lens_core.geometry import SAM_IMAGE_SIZE
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

#: Name of this geometry in the cache identity.
IMAGE_GEOMETRY = "sam-pad-1024-to-336"


@dataclass(frozen=True)
class SamFrame:
    """One image brought into SAM's frame.

    Attributes:
        resized: (h, w, 3) uint8, the image with its longest side resized to 1024.
        original_size: (H, W) of the image as loaded.
    """

    resized: np.ndarray
    original_size: tuple[int, int]

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) inside the padded frame (SAM's ``input_size``)."""
        return int(self.resized.shape[0]), int(self.resized.shape[1])

    def padded(self, size: int = SAM_IMAGE_SIZE) -> np.ndarray:
        """(size, size, 3) uint8: the resized image, zero (black) padded right and bottom."""
        h, w = self.input_size
        out = np.zeros((size, size, 3), dtype=np.uint8)
        out[:h, :w] = self.resized
        return out

    def padded_image(self, size: int = SAM_IMAGE_SIZE) -> Image.Image:
        """The padded square as a PIL image: what the MLLM's image processor receives."""
        return Image.fromarray(self.padded(size))  # (H, W, 3) uint8 -> RGB

    def sam_pixels(self) -> torch.Tensor:
        """(3, h, w) float32 in [0, 255], unpadded: the input of ``Sam.preprocess``."""
        return torch.from_numpy(np.ascontiguousarray(self.resized)).permute(2, 0, 1).float()


def frame_problem(height: int, width: int, size: int = SAM_IMAGE_SIZE) -> str | None:
    """Why an image of ``height`` x ``width`` cannot be brought into SAM's frame, or None.

    Resizing the longest side to ``size`` must leave the short side at least one pixel
    (a 1 x 3000 strip would become 0 x 1024: nothing to embed).
    """
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(int(height), int(width), size)
    if min(int(height), int(width)) < 1 or min(new_h, new_w) < 1:
        return f"image is {height}x{width}: its short side would be 0 px once its long side is {size}"
    return None


def sam_frame(image: Image.Image, size: int = SAM_IMAGE_SIZE) -> SamFrame:
    """Resize ``image`` (any PIL mode) so its longest side is ``size``, with SAM's own transform."""
    rgb = np.asarray(image.convert("RGB"))
    resized = ResizeLongestSide(size).apply_image(rgb)
    return SamFrame(resized=resized, original_size=(rgb.shape[0], rgb.shape[1]))
