"""The frozen guarantee, made checkable: LENS never changes the MLLM it reads.

LENS's claim (paper section 1) is that the MLLM's general abilities are untouched
because the MLLM is never trained or modified. :func:`mllm_checksum` fingerprints every
parameter and buffer of a model exactly, so a test (``tests/test_frozen.py``) or a user
can compare the MLLM before and after caching, training and attaching LENS.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on use: lens-chat's --help must not wait for it
    import torch
    from torch import nn


def mllm_checksum(model: "nn.Module") -> str:
    """sha256 (hex) over the names, dtypes, shapes and exact bytes of every parameter and buffer.

    Any change to any value (even one bit of a bfloat16 weight), a new or removed
    tensor, or a dtype change gives another checksum; the order of registration does
    not matter (names are sorted). Tensors are copied to the CPU one at a time, so a
    7B model on a GPU needs no second copy in host memory.

    Args:
        model: any module (``LlavaForConditionalGeneration`` in practice).
    Returns:
        64 hex characters.
    """
    import torch  # on use: see the note at the imports

    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    # remove_duplicate=False: tied weights (embeddings / lm_head) are hashed under every name.
    for name, tensor in model.named_parameters(remove_duplicate=False):
        tensors[f"param:{name}"] = tensor
    for name, tensor in model.named_buffers(remove_duplicate=False):
        tensors[f"buffer:{name}"] = tensor
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Raw bytes via a uint8 view: works for bfloat16 (which numpy cannot hold) and 0-d tensors.
        raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def parameters_requiring_grad(model: "nn.Module") -> list[str]:
    """Names of the parameters of ``model`` that would receive gradients (empty when frozen)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
