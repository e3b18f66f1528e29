"""What every MLLM adapter does with its decoder the same way: capture chosen layers' outputs and
stop the forward after the deepest, fingerprint weights cheaply, copy decoder layers for the warm start,
and read the last token's attention to the image tokens, layer by layer (``lens-cache probe-layers``).

Adapters (:mod:`lens_cache.backbones.llava`, :mod:`lens_cache.backbones.qwen2vl`) differ in how they
build inputs (templates, image tokens, position ids); these pieces do not depend on that.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch


class StopForward(Exception):
    """Raised by the hook of the deepest cached layer: the rest of the forward is not needed."""


def forward_until(
    forward: Callable[..., Any], decoder_layers: Sequence[torch.nn.Module], layers: Sequence[int], **inputs: Any
) -> dict[int, torch.Tensor]:
    """Run ``forward(**inputs)`` until the deepest of ``layers``; layer k -> (B, S, d) output of decoder layer k - 1.

    ``layers`` index ``hidden_states`` (sorted ascending): ``hidden_states[k]`` is the output of
    ``decoder_layers[k - 1]``. Deeper layers and the final norm never run.
    """
    captured: dict[int, torch.Tensor] = {}
    deepest = layers[-1]

    def hook_for(k: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[k] = output[0] if isinstance(output, tuple) else output
            if k == deepest:
                raise StopForward

        return hook

    handles = [decoder_layers[k - 1].register_forward_hook(hook_for(k)) for k in layers]
    try:
        forward(**inputs)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if deepest not in captured:
        raise RuntimeError(f"the forward never reached decoder layer {deepest - 1}")
    return captured


def tensors_fingerprint(tensors: Iterable[torch.Tensor], samples: int = 4096) -> str:
    """sha256 of ~``samples`` strided values of each tensor (and its shape), rounded to bfloat16 first,
    so a float16 checkpoint loaded as bfloat16 (GPU) or float32 (CPU) gives the same fingerprint."""
    digest = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)].to(torch.bfloat16).float().cpu()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()


def plain(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) float32 CPU copy, usable later in autograd-recorded code."""
    return t.float().cpu().clone()


def decoder_layer_state_dict(decoder_layers: Sequence[torch.nn.Module], index: int) -> dict[str, torch.Tensor]:
    """``decoder_layers[index]`` 's weights on the CPU (0-based; transformers' parameter names).

    Detached views of the model's own tensors when it is on the CPU (a copy of a 7B MLLM's two warm-start
    layers is 1.6 GB in float32), copies otherwise: read them (save, load into a head), do not modify them.
    """
    if not 0 <= index < len(decoder_layers):
        raise IndexError(f"decoder layer index {index} outside 0..{len(decoder_layers) - 1}")
    return {k: v.detach().to("cpu") for k, v in decoder_layers[index].state_dict().items()}


def attention_implementations(config: Any) -> str | dict:
    """The attention implementation of ``config`` and of each of its sub-configs (text, vision), in the
    nested form ``set_attn_implementation`` takes (``{"": own, "text_config": ..., ...}``)."""
    subs = {key: getattr(config, key, None) for key in getattr(config, "sub_configs", {})}
    subs = {key: attention_implementations(sub) for key, sub in subs.items() if sub is not None}
    return {"": config._attn_implementation, **subs} if subs else config._attn_implementation


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run the body with ``model`` (and every sub-model: decoder, vision tower) in transformers' ``eager``
    attention, the one that computes attention weights (``output_attentions=True``); the previous
    implementation of each is restored after, so the adapter's own forwards are unchanged."""
    previous = attention_implementations(model.config)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def last_token_image_attention(
    attentions: Sequence[torch.Tensor], image_positions: torch.Tensor, grid: int
) -> torch.Tensor:
    """(layers, grid, grid) float32 CPU: per decoder layer, the last token's attention to the image
    tokens (row-major over the grid), averaged over heads.

    Args:
        attentions: one (1, heads, S, S) tensor per decoder layer (``output_attentions=True``).
        image_positions: the grid x grid positions of the image tokens in the sequence, row-major.
    """
    if int(image_positions.numel()) != grid * grid:
        raise ValueError(f"{int(image_positions.numel())} image tokens do not form a {grid} x {grid} grid")
    rows = [layer[0, :, -1, image_positions].float().mean(0) for layer in attentions]
    return torch.stack(rows).reshape(len(rows), grid, grid).cpu()
