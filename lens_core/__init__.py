"""lens_core: the LENS model in pure torch (no file I/O, no CLI, no transformers import).

Modules, one concept each: ``config`` (LensConfig), ``head`` (segmentation head),
``keypoints`` (NMS + sub-pixel step), ``descriptor`` (keypoint descriptions),
``prompt_decoder`` (SAM mask-decoder adapter), ``losses``, ``metrics``, ``geometry``
(SAM's frame), ``model`` (Lens, build_lens). Not the model: ``files``, the one way every stage
writes files, and ``paths``, the one rule confining the paths a dataset file names to their folder
(this is the lowest package, which every stage may import; no model module uses them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import LensConfig
    from .model import Lens, LensOutput, build_lens

# Imported on first use: ``files`` and ``paths`` (the manifests import them) must not pay for torch,
# nor need its address space (a manifest is built under a memory cap: tests/test_manifests_refer.py).
_LAZY = {"Lens": "model", "LensConfig": "config", "LensOutput": "model", "build_lens": "model"}

__all__ = ["Lens", "LensConfig", "LensOutput", "build_lens"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lens_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
