"""The toy world's pretraining scenes: drawn on the fly, never from the dataset's images.

Pretraining draws scenes with :func:`lens_manifests.synthetic.make_scene` (the same
renderer as the dataset) from generators seeded by ``(TOY_NAMESPACE, stream, index)``.
The dataset's images are seeded by ``(seed, set, split, index)``: a different seed
sequence, so no pretraining scene is an image of ``synthetic:*`` and every score on
``synthetic:val``/``test`` is held out. ``stream`` separates the pretraining scenes
(:data:`TRAIN`) from the toy models' own held-out checks (:data:`HELD_OUT`).

A scene reaches a model as the pipeline feeds it: JPEG-encoded at the dataset's
quality, decoded, and brought into SAM's padded 1024 frame (:func:`sam_frame`), which
LLaVA also sees (resized to 336).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lens_cache.backbones.geometry import SamFrame, sam_frame
from lens_core.geometry import SAM_IMAGE_SIZE, mask_to_padded_frame
from lens_manifests.synthetic import COLOURS, JPEG_QUALITY, SHAPE_KINDS, Scene, make_scene

TOY_NAMESPACE = 7_031_977
TRAIN = 0
HELD_OUT = 1

#: Per-patch labels of the vision tower's dense pretraining: 0 is background.
COLOUR_NAMES = tuple(COLOURS)
KIND_NAMES = SHAPE_KINDS


@dataclass(frozen=True)
class ToyScene:
    """A scene as the models see it: the SAM frame of its JPEG round trip, and its shapes."""

    scene: Scene
    frame: SamFrame

    @property
    def shapes(self):
        return self.scene.shapes

    def low_res_mask(self, i: int, size: int = 256) -> torch.Tensor:
        """(size, size) float coverage of shape ``i`` in the padded frame (SAM's low-res masks)."""
        return mask_to_padded_frame(torch.from_numpy(self.scene.shapes[i].mask), self.frame.input_size, size)

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        """Original-pixel (x, y) -> padded-frame pixel (x, y) (ResizeLongestSide's scale)."""
        h, w = self.frame.original_size
        scale = SAM_IMAGE_SIZE / max(h, w)
        return np.asarray(xy, dtype=np.float64) * scale

    def cell_coverage(self, grid: int = 24) -> torch.Tensor:
        """(S, grid*grid): the fraction of each token-grid cell that each shape covers."""
        if not self.shapes:
            return torch.zeros(0, grid * grid)
        cover = torch.stack([self.low_res_mask(i, grid * 8) for i in range(len(self.shapes))])
        return torch.nn.functional.avg_pool2d(cover[None], 8)[0].flatten(1)

    def cell_occupancy(self, grid: int = 24, sub: int = 4) -> torch.Tensor:
        """(grid*grid, sub*sub): which sub-cells of each token-grid cell lie on a shape (the outline
        inside the patch, at ``sub`` x ``sub`` resolution)."""
        size = grid * sub
        if not self.shapes:
            return torch.zeros(grid * grid, sub * sub)
        cover = torch.stack([self.low_res_mask(i, size) for i in range(len(self.shapes))]).amax(0) > 0.5
        cells = cover.reshape(grid, sub, grid, sub).permute(0, 2, 1, 3)  # (gy, gx, sy, sx)
        return cells.reshape(grid * grid, sub * sub).float()

    def patch_labels(self, grid: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid*grid,) colour and kind labels of the token grid: the shape covering most of a cell, else 0."""
        colour = torch.zeros(grid * grid, dtype=torch.long)
        kind = torch.zeros(grid * grid, dtype=torch.long)
        if not self.shapes:
            return colour, kind
        frac = self.cell_coverage(grid)  # (S, grid*grid)
        best, who = frac.max(0)
        hit = best >= 0.5
        for i, s in enumerate(self.shapes):
            sel = hit & (who == i)
            colour[sel] = COLOUR_NAMES.index(s.colour) + 1
            kind[sel] = KIND_NAMES.index(s.kind) + 1
        return colour, kind


def scene_rng(stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([TOY_NAMESPACE, int(stream), int(index)])


def draw_scene(stream: int, index: int) -> ToyScene:
    """Scene ``index`` of ``stream``: a pure function of the two numbers."""
    scene = make_scene(scene_rng(stream, index), rule="cv2")
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    return ToyScene(scene, sam_frame(Image.open(buffer)))
