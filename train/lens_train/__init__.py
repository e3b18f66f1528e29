"""lens_train: stage 2 of LENS -- train, evaluate and use LENS on features cached by stage 1.

Layout (each subpackage's ``__init__`` says more); each line imports only from the lines above it:

- :mod:`.errors`, :mod:`.figures`, :mod:`.testing`: one-line user errors, the matplotlib figures, test helpers;
- :mod:`.training`: presets, configs, feature-store data, the training loop and checkpoints;
- :mod:`.evaluation`: ``lens-eval``'s gIoU / cIoU and the frozen-MLLM checksum;
- :mod:`.cli`: the ``lens-train`` and ``lens-eval`` console apps, and ``user_errors`` for every app;
- :mod:`.inference`: ``lens-segment`` (one image, live backbones) and ``lens-chat`` (the agent);
- :mod:`.general`: the frozen MLLM's general abilities (MME) and routing (``lens-general``);
- :mod:`.reproduction`: the paper's tables end to end (``python -m lens_train.reproduction``) and the core-only demo.

Using a trained head from Python (the one name imported from the package itself, on first use, so that
``import lens_train`` stays light)::

    from lens_train import Segmenter

    seg = Segmenter.from_pretrained("toy")  # a run folder, a model folder (lens-export-model) or "toy"
    result = seg("photo.png", "the red circle")
    result.mask, result.score               # (H, W) bool, SAM's predicted IoU
    result.overlay().save("overlay.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inference.segmenter import Segmenter

__all__ = ["Segmenter"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from .inference.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'lens_train' has no attribute {name!r}")
