"""A preset's ``precision`` on a device: the dtype a run trains in and the autocast its forward runs under.

``fp32``: float32 everywhere. ``bf16``: float32 weights, bf16 autocast on CUDA (float32 on the CPU).
``bf16-pure``: the whole model, its inputs and AdamW's state in bfloat16, on any device, as the
authors train. The trainer uses all but :func:`autocast_for` (evaluation's), and they stay importable
from :mod:`lens_train.training.trainer`, where they were first defined.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when the preset asks for bf16 compute; fp32 (no autocast) on the CPU.

    For "bf16-pure" this is what evaluation uses (its model is rebuilt in float32 and the bfloat16
    weights loaded into it); training a "bf16-pure" model runs without autocast (:func:`train_autocast`).
    """
    if device.type == "cuda" and precision in ("bf16", "bf16-pure"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The training forward's context: :func:`autocast_for`, but none for "bf16-pure" (the model itself is bf16)."""
    return contextlib.nullcontext() if precision == "bf16-pure" else autocast_for(device, precision)


def effective_precision(device: torch.device, precision: str) -> str:
    """How a run of ``precision`` trains on ``device``: "bf16" (autocast) only on CUDA, "bf16-pure" everywhere."""
    if precision == "bf16-pure":
        return precision
    return "bf16" if device.type == "cuda" and precision == "bf16" else "fp32"


def parameter_dtype(precision: str) -> torch.dtype:
    """dtype of the model, its inputs and AdamW's state while training: bfloat16 for "bf16-pure", else float32."""
    return torch.bfloat16 if precision == "bf16-pure" else torch.float32


def cast_for_training(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model in its training dtype (:func:`parameter_dtype`), in place.

    Under "bf16-pure" every parameter and buffer becomes bfloat16 (the authors cast the whole model),
    except the frozen random-Fourier matrix of SAM's positional encoding
    (``positional_encoding_gaussian_matrix``): segment_anything multiplies it with float32 coordinates,
    so it stays float32 and the positions it encodes are rounded to bfloat16 afterwards, not before.
    """
    dtype = parameter_dtype(precision)
    model.to(dtype)
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(getattr(module, "positional_encoding_gaussian_matrix", None), torch.Tensor):
                module.float()
    return model
