"""What one segmentation gives (:class:`SegmentResult`) and the pictures and files made from it.

``overlay_image`` is the paper's ``Overlay(I, mask)`` (Algorithm S1); :func:`write_result` writes what
``lens-segment`` leaves in its output folder (``mask.png`` 0/255, ``overlay.png``, ``panels.png``,
``result.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_core.files import replaced_on_success, write_text_atomically
from PIL import Image, ImageDraw

from ..errors import UserError

# numpy, torch and matplotlib are imported where used: `lens-segment --help` must not wait for them.
if TYPE_CHECKING:
    import numpy as np
    import torch

#: Colour of the predicted region in overlays (RGB).
MASK_COLOUR = (30, 220, 60)


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; refused (UserError, one line) if it exists and is not a folder."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"-o/--out {path} is a file, not a folder: give a folder (it is created if missing)")
    return path



@dataclass
class SegmentResult:
    """One segmentation of one image.

    An image larger than 4096 px on its longest side is segmented on its working image (downscaled once,
    ``lens_cache.images.working_image``): ``image``, ``probability``, ``logits``, the keypoints and the
    pictures are at that size, ``mask`` at the original's (``full_size``).

    Attributes:
        mask: (H, W) bool at the original size (``full_size``), ``probability > threshold`` (for a
            downscaled image: the logits upsampled bilinearly, in row stripes).
        probability: (h, w) float32, ``sigmoid(logits)``, at the size of ``image``.
        logits: (h, w) float32 mask logits at the size of ``image`` (CPU tensor).
        heatmap: (g, g) grounding map in (0, 1) over SAM's padded frame.
        points: (K, 2) keypoints (x, y) in grid cells; valid, used: (K,) bool.
        iou_prediction: SAM's predicted IoU of the mask (also :attr:`score`).
        image: the RGB image that was segmented.
        instruction: the user's text; question: what the MLLM was asked.
        threshold: on the probability.
        input_size, original_size: (h, w) inside SAM's frame and of ``image`` (what the backbones saw).
        full_size: (H, W) of the image as given (``original_size`` unless it was downscaled).
    """

    mask: np.ndarray
    probability: np.ndarray
    logits: torch.Tensor
    heatmap: torch.Tensor
    points: torch.Tensor
    valid: torch.Tensor
    used: torch.Tensor
    iou_prediction: float
    image: Image.Image
    instruction: str
    question: str
    threshold: float
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    full_size: tuple[int, int] | None = None

    @property
    def display_mask(self) -> np.ndarray:
        """``mask`` at the size of ``image`` (itself unless the image was downscaled), for pictures."""
        from .large_images import fit_mask

        return fit_mask(self.mask, self.original_size)

    @property
    def score(self) -> float:
        """SAM's predicted IoU of the mask (its own quality estimate, not a calibrated probability)."""
        return self.iou_prediction

    @property
    def keypoints(self) -> np.ndarray:
        """(m, 2) pixel (x, y) of the keypoints that prompted SAM (:attr:`keypoints_xy`)."""
        return self.keypoints_xy

    def overlay(self, *, keypoints: bool = True, alpha: float = 0.45) -> Image.Image:
        """The image with the mask tinted and outlined, keypoints as white dots (:func:`overlay_image`)."""
        return overlay_image(self.image, self.display_mask, keypoints_xy=self.keypoints_xy if keypoints else None,
                             alpha=alpha)

    @property
    def keypoints_xy(self) -> np.ndarray:
        """(m, 2) pixel (x, y) in ``image`` of the keypoints that prompted SAM (``summary()`` gives them in the
        original's pixels)."""
        from ..figures import grid_to_image_xy  # heavy: see the note on imports at the top

        grid_size = int(self.heatmap.shape[-1])
        xy = grid_to_image_xy(self.points, self.input_size, self.original_size, grid_size)
        return xy[(self.valid & self.used).numpy()]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly facts: sizes, area, keypoints, threshold (``result.json``)."""
        area = int(self.mask.sum())
        full = self.full_size or self.original_size
        scale = (full[1] / self.original_size[1], full[0] / self.original_size[0])  # x, y
        return {
            "instruction": self.instruction,
            "question": self.question,
            "threshold": self.threshold,
            "original_size": list(full),
            "mask_pixels": area,
            "mask_fraction": area / max(1, self.mask.size),
            "iou_prediction": self.iou_prediction,
            "keypoints_xy": [[round(float(x) * scale[0], 2), round(float(y) * scale[1], 2)] for x, y in self.keypoints_xy],
        }


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation, ``steps`` times (numpy only)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def overlay_image(
    image: Image.Image,
    mask: np.ndarray,
    *,
    keypoints_xy: np.ndarray | None = None,
    colour: tuple[int, int, int] = MASK_COLOUR,
    alpha: float = 0.45,
) -> Image.Image:
    """``image`` with ``mask`` tinted and outlined in ``colour``, keypoints as white dots.

    This is the paper's ``Overlay(I, mask)`` (Algorithm S1): same size as the image, so
    it can be shown beside it.

    Args:
        image: RGB (any mode is converted), size (W, H).
        mask: (H, W) bool.
        keypoints_xy: (m, 2) pixel (x, y), or None for no dots.
    Returns:
        RGB image of size (W, H).
    """
    import numpy as np  # heavy: see the note on imports at the top

    out = np.array(image.convert("RGB"), dtype=np.uint8)  # one uint8 copy; only the masked pixels go to float
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != out.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {out.shape[:2]}")
    tint = np.asarray(colour, dtype=np.float32)
    out[mask] = ((1 - alpha) * out[mask].astype(np.float32) + alpha * tint).round().clip(0, 255).astype(np.uint8)
    # A solid outline keeps a thin or pale region visible at any size.
    thickness = max(1, round(min(mask.shape) / 250))
    outline = _dilate(mask, thickness) & ~mask
    out[outline] = np.asarray(colour, dtype=np.uint8)
    result = Image.fromarray(out)
    if keypoints_xy is not None and len(keypoints_xy):
        draw = ImageDraw.Draw(result)
        radius = max(2.0, min(mask.shape) / 80)
        for x, y in np.asarray(keypoints_xy, dtype=np.float64):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 255, 255), outline=(0, 0, 0))
    return result


#: Longest side of the pictures in ``panels.png`` (a figure of three panels 3 inches wide at 100 dpi needs no more;
#: matplotlib copies an image several times in float64 to draw it).
PANEL_SIDE = 768


def write_panels(path: Path, result: SegmentResult) -> None:
    """image | heatmap + keypoints | prediction, like a row of ``lens-eval``'s overlays.png without ground truth."""
    import numpy as np  # heavy: see the note on imports at the top

    from ..figures import _pyplot, grid_to_image_xy, heatmap_on_image, save_figure
    from .large_images import fit_mask

    plt = _pyplot()
    h, w = result.original_size
    scale = min(1.0, PANEL_SIDE / max(h, w))
    shown = (max(1, round(h * scale)), max(1, round(w * scale)))  # what is drawn: at most PANEL_SIDE px
    picture = result.image if shown == (h, w) else result.image.resize((shown[1], shown[0]), Image.Resampling.BILINEAR)
    image01 = np.asarray(picture, dtype=np.float32) / 255.0
    heat = heatmap_on_image(result.heatmap, result.input_size, shown)
    xy = grid_to_image_xy(result.points, result.input_size, shown, int(result.heatmap.shape[-1]))
    good = (result.valid & result.used).numpy()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), squeeze=False)
    axes[0, 0].imshow(image01)
    axes[0, 1].imshow(image01)
    axes[0, 1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[0, 1].scatter(xy[good, 0], xy[good, 1], c="white", s=22, edgecolors="black", linewidths=0.6)
    axes[0, 2].imshow(np.asarray(overlay_image(picture, fit_mask(result.mask, shown))))
    fraction = result.mask.mean() if result.mask.size else 0.0
    titles = (result.instruction[:60], "heatmap + keypoints", f"prediction ({100 * fraction:.1f}% of the image)")
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=8)
        axes[0, c].set_xticks([]), axes[0, c].set_yticks([])
        axes[0, c].set_xlim(-0.5, shown[1] - 0.5), axes[0, c].set_ylim(shown[0] - 0.5, -0.5)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_result(out_dir: Path, result: SegmentResult, *, panels: bool = True) -> dict[str, Path]:
    """Write ``mask.png`` (0/255), ``overlay.png``, ``panels.png`` and ``result.json`` into ``out_dir``.

    Returns:
        name -> path of every file written.
    """
    import numpy as np  # heavy: see the note on imports at the top


    out_dir = check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"mask": out_dir / "mask.png", "overlay": out_dir / "overlay.png", "result": out_dir / "result.json"}
    pictures = {
        "mask": mask_picture(result.mask),  # (H, W) uint8: mode L
        "overlay": result.overlay(),  # at the size of result.image
    }
    for name, picture in pictures.items():
        with replaced_on_success(paths[name], suffix=".tmp.png") as tmp:
            picture.save(tmp, format="PNG")
    if panels:
        paths["panels"] = out_dir / "panels.png"
        write_panels(paths["panels"], result)
    write_text_atomically(paths["result"], json.dumps(result.summary(), indent=2) + "\n")
    return paths


def mask_picture(mask: np.ndarray) -> Image.Image:
    """``mask`` (H, W) bool as ``mask.png``'s picture: mode L, 0/255, with one uint8 copy at most (a 16384 x
    16384 mask is 256 MiB a copy)."""
    import numpy as np  # heavy: see the note on imports at the top

    return Image.fromarray(np.multiply(np.ascontiguousarray(mask).view(np.uint8), 255, dtype=np.uint8), "L")
