"""lens_core: the LENS model in pure torch (no file I/O, no CLI, no transformers import).

Modules, one concept each: ``config`` (LensConfig), ``head`` (segmentation head),
``keypoints`` (NMS + sub-pixel step), ``descriptor`` (keypoint descriptions),
``prompt_decoder`` (SAM mask-decoder adapter), ``losses``, ``metrics``, ``geometry``
(SAM's frame), ``model`` (Lens, build_lens).
"""

from .config import LensConfig
from .model import Lens, LensOutput, build_lens

__all__ = ["Lens", "LensConfig", "LensOutput", "build_lens"]
