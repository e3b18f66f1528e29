"""What only the LLaVA adapter has (tiny, CPU, float32); the contract every adapter keeps (states equal a full
forward, prefix sharing, early stop, identity, warm start, loading) is tests/test_backbones_contract.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lens_cache.backbones import build_extractor
from lens_cache.backbones.llava import LlavaBackbone
from lens_cache.backbones.tiny_llava import build_tiny_llava
from tests.helpers.images import padded_squares, random_image

QUESTIONS_A = [
    "Can you segment the red circle in this image?",
    "What object in this picture would someone use to carry water on a long walk?",
    "Can you segment the small blue square on the left in this image?",
]
QUESTIONS_B = ["Can you segment the green triangle in this image?"]


@pytest.fixture(scope="module")
def squares() -> list[Image.Image]:
    """Two non-square images brought into SAM's padded square, as the extractor feeds LLaVA."""
    return padded_squares()


@pytest.fixture(scope="module")
def encoded(squares):
    return LlavaBackbone.tiny(layers=(14, 30), device="cpu", dtype=torch.float32).encode(squares, [QUESTIONS_A, QUESTIONS_B])


def test_tiny_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny_llava()
    b, _ = build_tiny_llava()
    assert torch.equal(torch.rand(3), expected)  # the global RNG state is untouched
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_runs_in_bfloat16(squares, encoded):
    cuda32 = LlavaBackbone.tiny(layers=(14, 30), device="cuda", dtype=torch.float32)
    out = cuda32.encode(squares, [QUESTIONS_A, QUESTIONS_B])
    for a, b in zip(out, encoded):
        assert a.image_states[14].device.type == "cpu"
        torch.testing.assert_close(a.image_states[30], b.image_states[30], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a.text_states[0][14], b.text_states[0][14], atol=1e-3, rtol=1e-3)
    extractor = build_extractor(mllm="tiny", sam="tiny", layers=(14,), device="cuda")
    assert extractor.identity["compute_dtype"] == "bfloat16" and extractor.identity["sam"]["compute_dtype"] == "bfloat16"
    features = extractor.extract([random_image(3, 100, 200)], [QUESTIONS_B])[0]
    assert features.image_states[14].dtype == torch.float32 and features.sam_embedding.shape == (256, 64, 64)
    assert torch.isfinite(features.text_states[0][14]).all()


def test_head_sizes_name_grouped_query_attention_only_when_there():
    """LLaVA-1.5 (multi-head) records the head sizes as before (the contract test checks its five fields); a GQA
    text model adds num_key_value_heads."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    gqa = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    assert LlavaBackbone.head_sizes.fget(SimpleNamespace(text_config=gqa))["num_key_value_heads"] == 2
    mha = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)
    assert "num_key_value_heads" not in LlavaBackbone.head_sizes.fget(SimpleNamespace(text_config=mha))
