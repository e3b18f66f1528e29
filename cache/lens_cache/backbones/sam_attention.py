"""SAM's image-encoder attention a band of query rows at a time: the same arithmetic, a fraction of the memory.

SAM's ViT attends globally in four of its blocks (``global_attn_indexes``): over the 64 x 64 = 4096 tokens
of its 1024-pixel input, each head holds a 4096 x 4096 score matrix, and ``Attention.forward`` keeps several
at once (scores, the decomposed relative-position sum, the softmax). For ViT-H (16 heads) in float32 that is
about 1.07 GB per tensor and 3-4 GB at the peak of each global block, on top of the weights: what a float32
stage-1 build on a 24 GB CPU machine, with LLaVA-1.5-7B's 15 GB beside it, cannot hold (measured in
BENCHMARKS.md). :func:`attention_in_row_bands` computes the same attention ``rows`` rows of the token grid
at a time: each query's scores, relative-position terms, softmax and weighted sum are those of SAM's code
(softmax is per query row), so only the peak changes (``rows / 64`` of it); results agree with the stock
forward to float32 rounding (tested at atol 1e-5).

Builds use it on the CPU (:class:`lens_cache.backbones.sam.SamImageEncoder`); on a GPU the stock forward
runs (bf16 halves the matrices and an 80 GB card has room).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

#: rows of the 64 x 64 token grid per band on the CPU: 1/8 of the score matrices' peak
CPU_ROWS = 8


def banded_attention(module: Attention, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``module.forward(x)`` (segment_anything's ``Attention``) computed ``rows`` query rows at a time."""
    batch, height, width, _ = x.shape
    heads = module.num_heads
    qkv = module.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)
    dim = q.shape[-1]
    grid_q = q.reshape(batch * heads, height, width, dim)
    if module.use_rel_pos:
        rel_h = get_rel_pos(height, height, module.rel_pos_h)  # (q_h, k_h, C)
        rel_w = get_rel_pos(width, width, module.rel_pos_w)  # (q_w, k_w, C)
    keys = k.transpose(-2, -1)
    out = []
    for top in range(0, height, rows):
        band = grid_q[:, top : top + rows]  # (B*heads, r, W, C)
        r = band.shape[1]
        scores = (band.reshape(batch * heads, r * width, dim) * module.scale) @ keys
        if module.use_rel_pos:
            term_h = torch.einsum("bhwc,hkc->bhwk", band, rel_h[top : top + r])
            term_w = torch.einsum("bhwc,wkc->bhwk", band, rel_w)
            scores = (scores.view(batch * heads, r, width, height, width)
                      + term_h[:, :, :, :, None] + term_w[:, :, :, None, :]).view(batch * heads, r * width, -1)
        out.append(scores.softmax(dim=-1) @ v)
        del scores
    attended = torch.cat(out, dim=1)
    attended = attended.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return module.proj(attended)


@contextlib.contextmanager
def attention_in_row_bands(encoder: torch.nn.Module, rows: int | None) -> Iterator[None]:
    """Within the block, every ``Attention`` of ``encoder`` called on a token grid of at least four bands
    runs :func:`banded_attention` (the global blocks' 64 rows; windowed blocks, 14 x 14, keep SAM's
    forward: their matrices are small); ``rows`` None: nothing changes."""
    if rows is None:
        yield
        return
    patched = [m for m in encoder.modules() if isinstance(m, Attention)]

    def forward_of(module: Attention):
        stock = module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            return banded_attention(module, x, rows) if x.shape[1] >= 4 * rows else stock(x)

        return forward

    for module in patched:
        module.forward = forward_of(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward again
