"""Frozen backbones of stage 1: an MLLM adapter + SAM's image encoder behind one FeatureExtractor.

MLLMs are found through two registries, so another family is one new adapter module that calls
``register_mllm_adapter`` (and ``register_builtin_mllm`` for its tiny model), declared as an entry point of
the group ``lens_cache.mllm_adapters`` (``pyproject.toml``; this module is not edited):

- built-in MLLMs by name (``--mllm NAME``; models built in code or shipped, not the training
  presets of ``lens_train.training.presets``): ``"tiny"`` (random LLaVA), ``"tiny-qwen2vl"``,
  ``"tiny-qwen25vl"``, ``"tiny-onevision"`` (random, :mod:`.qwen2vl`, :mod:`.onevision`) and ``"toy"``
  (the project's pretrained toy LLaVA, shipped in ``cache/lens_cache/backbones/toy_weights``: :mod:`.toy`);
- adapters by the checkpoint's ``config.model_type`` (``"llava"``, ``"qwen2_vl"``,
  ``"qwen2_5_vl"``, ``"llava_onevision"``), for local folders or names in the offline Hugging Face cache.

Typical use::

    extractor = build_extractor(mllm="llava-hf/llava-1.5-7b-hf", sam="vit_h:/ckpt/sam_vit_h_4b8939.pth")
    features = extractor.extract(images, questions)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

# ``lens-cache build``'s default ``--layers`` (the main layer of the preset made for the MLLM), the warm start,
# the grid and the preset of every backbone: the one table of :mod:`.defaults`.
from .defaults import DEFAULT_LAYER, default_layers

if TYPE_CHECKING:
    from .base import FeatureExtractor, ImageFeatures
    from .extractor import LensFeatureExtractor
    from .geometry import IMAGE_GEOMETRY, SamFrame, sam_frame
    from .llava import LlavaBackbone
    from .mllm import MllmBackbone, MllmCheckpointNotFoundError, MllmStates, UnsupportedMllmError
    from .sam import SamCheckpointNotFoundError, SamImageEncoder, build_sam, sam_identity

# Names imported on first use: ``lens_cache.backbones.sam`` (stage 2) must not pay for
# importing transformers.
_LAZY = {
    "FeatureExtractor": "base",
    "ImageFeatures": "base",
    "LensFeatureExtractor": "extractor",
    "IMAGE_GEOMETRY": "geometry",
    "SamFrame": "geometry",
    "sam_frame": "geometry",
    "LlavaBackbone": "llava",
    "MllmBackbone": "mllm",
    "MllmCheckpointNotFoundError": "mllm",
    "MllmStates": "mllm",
    "UnsupportedMllmError": "mllm",
    "SamCheckpointNotFoundError": "sam",
    "SamImageEncoder": "sam",
    "build_sam": "sam",
    "sam_identity": "sam",
}

#: ``loader(name_or_path, *, layers, device, dtype) -> MllmBackbone``
MllmLoader = Callable[..., "MllmBackbone"]
#: ``builtin(*, layers, device, dtype) -> MllmBackbone``: an MLLM selected by name, built in code or shipped
BuiltinMllm = Callable[..., "MllmBackbone"]


def _llava_from_pretrained(name_or_path: str, **kwargs: Any) -> "MllmBackbone":
    from .llava import LlavaBackbone

    return LlavaBackbone.from_pretrained(name_or_path, **kwargs)


def _llava_tiny(**kwargs: Any) -> "MllmBackbone":
    from .llava import LlavaBackbone

    return LlavaBackbone.tiny(**kwargs)


def _llava_toy(**kwargs: Any) -> "MllmBackbone":
    from .llava import LlavaBackbone

    return LlavaBackbone.toy(**kwargs)


MLLM_ADAPTERS: dict[str, MllmLoader] = {"llava": _llava_from_pretrained}
BUILTIN_MLLMS: dict[str, BuiltinMllm] = {"tiny": _llava_tiny, "toy": _llava_toy}




def register_mllm_adapter(model_type: str, loader: MllmLoader) -> None:
    """Make checkpoints whose ``config.model_type`` is ``model_type`` loadable with ``loader``."""
    MLLM_ADAPTERS[model_type] = loader


def register_builtin_mllm(name: str, build: BuiltinMllm) -> None:
    """Make ``--mllm NAME`` call ``build`` (a model built in code, or shipped)."""
    BUILTIN_MLLMS[name] = build


#: Entry-point group of adapter modules: each registers itself (register_mllm_adapter / register_builtin_mllm)
#: when imported, and imports transformers only when a model is built. This project's own (Qwen2-VL,
#: LLaVA-OneVision) are declared in pyproject.toml; another package adds a backbone the same way, without
#: editing this module.
ADAPTER_ENTRY_POINTS = "lens_cache.mllm_adapters"


def _load_adapter_modules() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ADAPTER_ENTRY_POINTS):
        entry.load()


_load_adapter_modules()


def build_mllm(
    mllm: str = "toy",
    *,
    layers: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    question_set: str | None = None,
) -> "MllmBackbone":
    """The frozen MLLM adapter for a built-in name (``tiny``, ``toy``, ...) or a checkpoint (folder or HF-cache name).

    ``question_set``: a built-in question-template set (``authors``, ``single``: :mod:`lens_cache.questions`);
    None: the adapter's default (``authors``; ``single`` for the toy and tiny models).

    Raises:
        MllmCheckpointNotFoundError: no such built-in MLLM or checkpoint (one-line message).
        UnsupportedMllmError: the checkpoint's model type has no registered adapter.
    """
    from .mllm import UnsupportedMllmError, load_mllm_config

    layers = tuple(layers) if layers is not None else default_layers(mllm)
    extra = {"question_set": question_set} if question_set is not None else {}
    if mllm in BUILTIN_MLLMS:
        return BUILTIN_MLLMS[mllm](layers=layers, device=device, dtype=dtype, **extra)
    model_type = load_mllm_config(mllm).model_type
    if model_type not in MLLM_ADAPTERS:
        raise UnsupportedMllmError(
            f"{mllm} is a {model_type!r} checkpoint; MLLM adapters exist for: {', '.join(sorted(MLLM_ADAPTERS))}"
        )
    return MLLM_ADAPTERS[model_type](mllm, layers=layers, device=device, dtype=dtype, **extra)


def build_extractor(
    mllm: str = "toy",
    sam: str = "toy",
    layers: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    question_set: str | None = None,
) -> "LensFeatureExtractor":
    """The FeatureExtractor of stage 1: MLLM ``mllm`` + SAM ``sam`` on one device.

    Args:
        mllm: ``"toy"``, ``"tiny"``, ``"tiny-qwen2vl"`` or a llava-hf / Qwen2-VL folder or HF-cache name.
        sam: ``"toy"``, ``"tiny"`` or ``vit_h:PATH`` (``vit_l:``, ``vit_b:``).
        layers: cached MLLM layers (``hidden_states`` indices), e.g. ``(14,)`` or ``(14, 30)``;
            default :func:`default_layers` of ``mllm``.
        device: default CUDA when available, else CPU.
        dtype: compute dtype of both models; default bfloat16 on CUDA, float32 on CPU.
        question_set: see :func:`build_mllm`.
    """
    from .runtime import resolve_device, resolve_dtype
    from .extractor import LensFeatureExtractor
    from .sam import SamImageEncoder

    dev = resolve_device(device)
    compute = resolve_dtype(dtype, dev)
    # SAM first: a missing SAM checkpoint fails before the (slow) MLLM load.
    sam_encoder = SamImageEncoder.from_spec(sam, device=dev, dtype=compute)
    mllm_backbone = build_mllm(mllm, layers=layers, device=dev, dtype=compute, question_set=question_set)
    return LensFeatureExtractor(mllm=mllm_backbone, sam=sam_encoder)


__all__ = [
    "IMAGE_GEOMETRY",
    "MLLM_ADAPTERS",
    "BUILTIN_MLLMS",
    "DEFAULT_LAYER",
    "FeatureExtractor",
    "ImageFeatures",
    "LensFeatureExtractor",
    "LlavaBackbone",
    "MllmBackbone",
    "MllmCheckpointNotFoundError",
    "MllmStates",
    "SamCheckpointNotFoundError",
    "SamFrame",
    "SamImageEncoder",
    "UnsupportedMllmError",
    "build_extractor",
    "default_layers",
    "build_mllm",
    "build_sam",
    "register_mllm_adapter",
    "register_builtin_mllm",
    "sam_frame",
    "sam_identity",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lens_cache.backbones' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
