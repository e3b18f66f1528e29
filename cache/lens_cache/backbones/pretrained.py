"""Loading a checkpoint of an adapter's family: the one ``from_pretrained`` of the prefix-sharing adapters.

:class:`PretrainedFamily` is a base of :class:`~.prefix_sharing.PrefixSharingBackbone`: its
:meth:`~PretrainedFamily.from_pretrained` reads the checkpoint's config (a local folder or a name in the
Hugging Face cache, local files only: :func:`~.mllm.load_mllm_config`), refuses another family in one line,
loads the model in the chosen dtype (bfloat16 on CUDA, float32 on the CPU unless told otherwise) and its
processor, never running code from the checkpoint (``trust_remote_code=False``), and freezes the model on the
chosen device (eval mode, no gradients). An adapter names only what differs: the ``config.model_type`` values it
loads, its family (for the refusal), its default layers, its model class, and what its saved processor may lack.

Importing this module is cheap (the registry imports the adapters): transformers is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self, Sequence

import torch

from .runtime import resolve_device, resolve_dtype


class PretrainedFamily:
    """The loader of an adapter's checkpoints; the adapter sets the class attributes and :meth:`_model_class`."""

    #: The ``config.model_type`` values :meth:`from_pretrained` loads.
    MODEL_TYPES: tuple[str, ...] = ()
    #: The family as the refusal of another checkpoint names it (``"LLaVA"``).
    FAMILY: str = ""
    #: :meth:`from_pretrained`'s ``layers`` when none are given.
    DEFAULT_LAYERS: tuple[int, ...] = (14,)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        layers: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load a checkpoint of the adapter's family (local folder or HF-cache name): offline (local files
        only), never remote code, frozen (eval mode, no gradients) on ``device``.

        Args:
            layers: default :attr:`DEFAULT_LAYERS`.
            device: default the first CUDA device, else the CPU (:func:`~.runtime.resolve_device`).
            dtype: default bfloat16 on CUDA, float32 on the CPU (:func:`~.runtime.resolve_dtype`).
            kwargs: the adapter's other arguments (prompt and question templates, image settings, ...).
        Raises:
            MllmCheckpointNotFoundError: no checkpoint there (one line).
            UnsupportedMllmError: the checkpoint is not one of :attr:`MODEL_TYPES` (one line naming its type).
        """
        from transformers import AutoProcessor

        from .mllm import UnsupportedMllmError, load_mllm_config

        config = load_mllm_config(name_or_path)
        if config.model_type not in cls.MODEL_TYPES:
            raise UnsupportedMllmError(
                f"{name_or_path} is not a {cls.FAMILY} checkpoint (model_type {config.model_type!r})")
        model_class = cls._model_class(config.model_type)
        dev = resolve_device(device)
        local = Path(name_or_path).expanduser()
        source = str(local) if local.exists() else name_or_path  # what load_mllm_config read
        model = model_class.from_pretrained(
            source, dtype=resolve_dtype(dtype, dev), local_files_only=True, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        cls._complete_processor(processor, model.config)
        model.to(dev).eval().requires_grad_(False)
        return cls(model, processor, name_or_path=str(name_or_path),
                   layers=cls.DEFAULT_LAYERS if layers is None else layers, **kwargs)

    @classmethod
    def _model_class(cls, model_type: str) -> Any:
        """The transformers ``*ForConditionalGeneration`` class of a checkpoint of ``model_type`` (one of
        :attr:`MODEL_TYPES`), imported on first use."""
        raise NotImplementedError

    @classmethod
    def _complete_processor(cls, processor: Any, config: Any) -> None:
        """Fill settings the checkpoint's saved processor lacks (nothing by default)."""
