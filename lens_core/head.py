"""The segmentation head (paper 3.1): two decoder layers of the MLLM's own shape.

Each layer mirrors its backbone's decoder layer with transformers' parameter names
(``LensConfig.layer_type``): ``llama`` is ``LlamaDecoderLayer`` (RMSNorm, multi-head
attention without biases, rotary positions, a causal mask, SwiGLU MLP; LLaVA-1.5),
``qwen2`` is ``Qwen2DecoderLayer`` (the same with biases on the q/k/v projections,
none on o_proj; Qwen2-VL's language model). Both take grouped-query attention
(``num_key_value_heads`` < ``num_heads``). So the head can be warm-started from the
MLLM's layers k and k+1 by loading their state dicts as they are, strictly.
Layer 1's text-to-image attention becomes the grounding heatmap A_c^1; layer 2's
output gives the image features F_i^2 and the start-of-answer token f_s^2.

What the head reads is ``LensConfig.head_input``: the paper's ``[F_i; F_t]``, or (``full_sequence``,
the authors' code) the whole layer-k sequence ``[F_p; F_i; F_t]`` with the pre-image prefix F_p (BOS,
system prompt, ``USER:``: the same states for every image of a causal MLLM, cached once per store).
Its layer-2 output optionally passes a fresh final RMSNorm (``final_norm``), as the authors' head is a
``LlamaModel`` whose ``last_hidden_state`` the descriptor reads.

Positions are plain 1-D rotary positions 0..L-1 over what the head reads. For
LLaVA-1.5 these are the MLLM's own positions shifted by the prefix length (RoPE only
sees differences). For Qwen2-VL they are NOT the MLLM's: its M-RoPE gives the image
tokens 2-D (row, column) positions and the text after the image starts at the image's
first position + the grid side. The head's layers therefore compute what the MLLM's
layers compute on the same input *with 1-D positions* (text-only M-RoPE, all three
components equal, is exactly this 1-D RoPE), not what they compute inside the MLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import LensConfig


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm (statistics in float32)."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """LLaMA's rotary position embedding (default rope type), and Qwen2-VL's multimodal variant."""

    def __init__(self, head_dim: int, *, theta: float, mrope_section: tuple[int, ...] | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = mrope_section

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (L, head_dim), float32, for positions (L,) or, with ``mrope_section``, (3, L):
        frequency pair j takes its angle from component 0, 1 or 2 as the section it falls in (Qwen2-VL's
        ``recomposition_frequencies``)."""
        inv_freq = self.inv_freq.to(positions.device)
        if positions.dim() == 1:
            freqs = positions.float()[:, None] * inv_freq[None, :]
        else:
            per_component = positions.float()[:, :, None] * inv_freq[None, None, :]  # (3, L, hd/2)
            component = torch.repeat_interleave(
                torch.arange(3, device=positions.device), torch.tensor(self.mrope_section, device=positions.device))
            freqs = per_component.gather(0, component.view(1, 1, -1).expand(1, per_component.shape[1], -1))[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def mrope_positions(prefix_length: int, grid_size: int, text_length: int, device=None) -> torch.Tensor:
    """(3, P + g*g + L_t) Qwen2-VL position ids of [prefix; image grid; text] (``get_rope_index`` for one image
    whose merged grid is g x g): the prefix and the text count on in all three components; image token
    (row, col) is at (P, P + row, P + col); the text starts at P + g."""
    prefix = torch.arange(prefix_length, device=device).expand(3, -1)
    rows, cols = torch.meshgrid(torch.arange(grid_size, device=device), torch.arange(grid_size, device=device),
                                indexing="ij")
    image = torch.stack((torch.zeros_like(rows.flatten()), rows.flatten(), cols.flatten())) + prefix_length
    text = (torch.arange(text_length, device=device) + prefix_length + grid_size).expand(3, -1)
    return torch.cat((prefix, image, text), dim=1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, L, hd) -> (B, kv_heads * groups, L, hd), each key/value head serving ``groups``
    consecutive query heads (transformers' ``repeat_kv``); the tensor itself when ``groups`` is 1."""
    if groups == 1:
        return x
    batch, kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, kv_heads * groups, length, head_dim)


class SelfAttention(nn.Module):
    """Causal self-attention with rotary positions and the parameters of ``LlamaAttention``
    (``qkv_bias=False``) or ``Qwen2Attention`` (``qkv_bias=True``); grouped-query when
    ``num_kv_heads`` < ``num_heads``."""

    def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            x: (B, L, d). cos, sin: (L, head_dim).
        Returns:
            (B, L, d) output and, if asked, the attention probabilities (B, heads, L, L) in float32.
        """
        batch, length, dim = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        kv_shape = (batch, length, self.num_kv_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(kv_shape).transpose(1, 2)
        v = self.v_proj(x).view(kv_shape).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        if return_attention:
            # Eager path: the probabilities themselves are the grounding map's source.
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
            out = (probs.to(v.dtype) @ v)
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.o_proj(out), probs


class SwiGLU(nn.Module):
    """LlamaMLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer with the parameter names of transformers' ``LlamaDecoderLayer``
    (``layer_type="llama"``) or ``Qwen2DecoderLayer`` (``"qwen2"``: q/k/v biases)."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_size: int,
        eps: float,
        num_kv_heads: int | None = None,
        layer_type: str = "llama",
    ) -> None:
        super().__init__()
        if layer_type not in ("llama", "qwen2"):
            raise ValueError(f"layer_type must be 'llama' or 'qwen2', got {layer_type!r}")
        self.input_layernorm = RMSNorm(dim, eps=eps)
        self.self_attn = SelfAttention(
            dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, qkv_bias=layer_type == "qwen2"
        )
        self.post_attention_layernorm = RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim=dim, hidden=mlp_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, probs = self.self_attn(self.input_layernorm(x), cos, sin, return_attention=return_attention)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs


def peak_normalize(grounding: torch.Tensor, *, detach_peak: bool = True) -> torch.Tensor:
    """Divide each map by its peak and clamp into (0, 1), as the official code does.

    Args:
        grounding: (B, L_i) non-negative attention mass per image token.
        detach_peak: True (official) fixes the divisor in the backward pass, so the map's
            shape is trained while its scale is not. Its gradient is then not that of the
            normalised map: lowering the top cells also lowers the divisor, which the detached
            gradient ignores, and from a random head it drives the map flat. False gives
            the exact gradient of the scale-free map.
    Returns:
        (B, L_i) in [1e-6, 1 - 1e-6]; the peak cell is 1 - 1e-6.
    """
    peak = grounding.detach() if detach_peak else grounding
    peak = peak.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return (grounding / peak).clamp(1e-6, 1 - 1e-6)


@dataclass
class HeadOutput:
    """What the head hands to the keypoint and descriptor stages.

    Attributes:
        heatmap: (B, g, g) grounding map A_c^1, peak-normalised into (0, 1).
        image_features: (B, d, g, g) F_i^2, layer 2's image-token states on the grid.
        start_token: (B, d) f_s^2, layer 2's state of the start-of-answer token.
    """

    heatmap: torch.Tensor
    image_features: torch.Tensor
    start_token: torch.Tensor


class SegmentationHead(nn.Module):
    """Two decoder layers over [F_i; F_t] (paper eq. 2)."""

    def __init__(self, *, config: LensConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            DecoderLayer(
                dim=config.hidden_size,
                num_heads=config.num_heads,
                mlp_size=config.mlp_size,
                eps=config.rms_norm_eps,
                num_kv_heads=config.kv_heads,
                layer_type=config.layer_type,
            )
            for _ in range(2)
        )
        head_dim = config.hidden_size // config.num_heads
        section = (config.mrope_section or (16, 24, 24)) if config.rope == "mrope" else None
        if section is not None and sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(section)} does not cover head_dim / 2 = {head_dim // 2}: set mrope_section")
        self.rotary = RotaryEmbedding(head_dim, theta=config.rope_theta, mrope_section=section)
        # A LlamaModel's final norm (fresh, not warm-started) when the config asks for it.
        self.norm = RMSNorm(config.hidden_size, eps=config.final_norm_eps) if config.final_norm else None

    def load_decoder_layers(self, state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Warm start from two decoder-layer state dicts of the backbone (e.g. LLaVA's layers 14 and 15),
        ``LlamaDecoderLayer`` or ``Qwen2DecoderLayer`` ones as ``config.layer_type`` says.

        Loading is strict: a key that is missing or unexpected is an error, never silently dropped.
        """
        if len(state_dicts) != 2:
            raise ValueError(f"the head has 2 layers; got {len(state_dicts)} state dicts")
        for layer, state in zip(self.layers, state_dicts):
            layer.load_state_dict(dict(state), strict=True)

    def forward(
        self,
        image_states: torch.Tensor,
        text_states: torch.Tensor,
        text_lengths: torch.Tensor,
        prefix_states: torch.Tensor | None = None,
    ) -> HeadOutput:
        """
        Args:
            image_states: (B, L_i, d) cached image-token states F_i, L_i = g * g.
            text_states: (B, L_t, d) cached text states F_t, right-padded; the last
                valid row of each is the start-of-answer token.
            text_lengths: (B,) number of valid text rows (>= 1).
            prefix_states: (P, d) or (B, P, d) states of the tokens before the image (BOS, system
                prompt, ``USER:``); required when ``config.head_input`` is ``full_sequence``, not
                read otherwise.
        Returns:
            HeadOutput.
        """
        cfg = self.config
        if image_states.dim() != 3 or image_states.shape[1:] != (cfg.num_image_tokens, cfg.hidden_size):
            raise ValueError(
                f"image_states must be (B, {cfg.num_image_tokens}, {cfg.hidden_size}), got {tuple(image_states.shape)}"
                " (a cache built for another backbone or grid?)"
            )
        batch = image_states.shape[0]
        if text_states.dim() != 3 or text_states.shape[0] != batch or text_states.shape[2] != cfg.hidden_size:
            raise ValueError(
                f"text_states must be (B={batch}, L_t, {cfg.hidden_size}), got {tuple(text_states.shape)}"
            )
        if text_lengths.shape != (batch,):
            raise ValueError(f"text_lengths must be (B={batch},), got shape {tuple(text_lengths.shape)}")
        if text_lengths.device.type != "meta" and (
            bool((text_lengths < 1).any()) or bool((text_lengths > text_states.shape[1]).any())
        ):
            raise ValueError(f"text_lengths must be in [1, {text_states.shape[1]}], got {text_lengths.tolist()}")
        text_lengths = text_lengths.to(image_states.device).long()

        dtype = self.layers[0].input_layernorm.weight.dtype
        num_image = cfg.num_image_tokens
        parts = [image_states, text_states]
        if cfg.head_input == "full_sequence":
            parts.insert(0, self._batched_prefix(prefix_states, batch, image_states))
        start = parts[0].shape[1] if len(parts) == 3 else 0  # where the image tokens begin
        # Right padding is harmless under the causal mask: a valid token never attends to a later pad.
        x = torch.cat([p.to(dtype) for p in parts], dim=1)
        if cfg.rope == "mrope":
            positions = mrope_positions(start, cfg.grid_size, text_states.shape[1], device=x.device)
        else:
            positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = self.rotary(positions)

        x, probs = self.layers[0](x, cos, sin, return_attention=True)
        text_begin = start + num_image
        text_to_image = probs.mean(dim=1)[:, text_begin:, start:text_begin]  # (B, L_t, L_i), averaged over heads
        rows = torch.arange(text_states.shape[1], device=x.device)
        if cfg.heatmap_from == "last":
            select = (rows[None, :] == (text_lengths - 1)[:, None]).float()
        else:
            select = (rows[None, :] < text_lengths[:, None]).float() / text_lengths[:, None].float()
        grounding = torch.einsum("bt,bti->bi", select, text_to_image)  # (B, L_i)
        heatmap = peak_normalize(grounding, detach_peak=cfg.detach_peak).view(batch, cfg.grid_size, cfg.grid_size)

        x, _ = self.layers[1](x, cos, sin)
        if self.norm is not None:
            x = self.norm(x)
        image_features = x[:, start:text_begin].transpose(1, 2).reshape(batch, cfg.hidden_size, cfg.grid_size, cfg.grid_size)
        start_token = x[torch.arange(batch, device=x.device), text_begin + text_lengths - 1]
        return HeadOutput(heatmap=heatmap, image_features=image_features, start_token=start_token)

    def _batched_prefix(self, prefix_states: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, P, d) prefix states from (P, d) or (B, P, d); a one-line error when they are missing or misshapen."""
        d = self.config.hidden_size
        if prefix_states is None:
            raise ValueError(
                "head_input 'full_sequence' needs the pre-image prefix states (BOS, system prompt, USER:):"
                " rebuild the store with a lens-cache that caches them, or train with head_input 'image_text'"
            )
        if prefix_states.dim() == 2:
            prefix_states = prefix_states.unsqueeze(0).expand(batch, -1, -1)
        if prefix_states.dim() != 3 or prefix_states.shape[0] != batch or prefix_states.shape[2] != d:
            raise ValueError(f"prefix_states must be (P, {d}) or (B={batch}, P, {d}), got {tuple(prefix_states.shape)}")
        return prefix_states.to(like.device)
