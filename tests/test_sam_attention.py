"""SAM's global attention in bands of query rows equals SAM's own forward, and the encoder's output with it."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from lens_cache.backbones.sam_attention import attention_in_row_bands, banded_attention


@pytest.mark.parametrize("rel_pos", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_banded_attention_equals_sams_forward(rel_pos, rows):
    torch.manual_seed(0)
    module = Attention(dim=48, num_heads=3, qkv_bias=True, use_rel_pos=rel_pos, input_size=(16, 12))
    if rel_pos:  # SAM initialises them at zero; random ones make the relative terms count
        torch.nn.init.normal_(module.rel_pos_h, std=0.5)
        torch.nn.init.normal_(module.rel_pos_w, std=0.5)
    x = torch.randn(2, 16, 12, 48)
    torch.testing.assert_close(banded_attention(module, x, rows), module(x), atol=1e-5, rtol=1e-5)


def test_the_encoder_with_bands_gives_the_stock_embedding_and_is_restored(monkeypatch):
    """A SAM ViT with a windowed and a global block at SAM's 1024 input: only the global block is banded."""
    from functools import partial

    import lens_cache.backbones.sam_attention as bands
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(1)
    encoder = ImageEncoderViT(depth=2, embed_dim=32, img_size=1024, mlp_ratio=2.0, num_heads=2, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=14, out_chans=16,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    for block in encoder.blocks:
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    pixels = torch.randn(1, 3, 1024, 1024)
    calls = []
    monkeypatch.setattr(bands, "banded_attention", lambda *a: calls.append(a[2]) or banded_attention(*a))
    with torch.no_grad():
        stock = encoder(pixels)
        with attention_in_row_bands(encoder, 8):
            banded = encoder(pixels)
    assert calls == [8]  # the global block (a 64-row grid) only; windows of 14 rows keep SAM's forward
    torch.testing.assert_close(banded, stock, atol=1e-5, rtol=1e-4)
    assert all("forward" not in vars(m) for m in encoder.modules())  # SAM's own forward again


def test_the_cpu_encoder_bands_by_default_and_a_gpu_one_does_not():
    from lens_cache.backbones.sam import CPU_ROWS, SamImageEncoder, build_tiny_sam

    cpu = SamImageEncoder(build_tiny_sam(), spec="tiny", device=torch.device("cpu"), dtype=torch.float32)
    assert cpu.attention_rows == CPU_ROWS
    stock = SamImageEncoder(build_tiny_sam(), spec="tiny", device=torch.device("cpu"), dtype=torch.float32,
                            attention_rows=None)
    assert stock.attention_rows is None
