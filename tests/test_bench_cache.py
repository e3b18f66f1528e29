"""lens_cache.flops (the FLOP model) against hand counts and torch's FlopCounterMode, the real-size LLaVA config
(lens_cache.backbones.real_configs), and a tiny CPU run of benchmarks/bench_cache.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lens_cache import flops
from lens_cache.backbones import real_configs

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cache.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cache", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_cache"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_cache", None)


def test_decoder_flops_by_hand():
    # d=8, MLP 16, 2 heads of 4, 2 layers. Per layer: q,k,v,o 4 x 8 x 8 = 256, MLP 3 x 8 x 16 = 384.
    assert flops.decoder_layer_matmul_params(8, 16, 2, 2, 4) == 640
    # 3 new tokens, no context: linear 2 x 640 x 3 = 3840; causal pairs 1+2+3 = 6 -> 4 x (2 x 4) x 6 = 192.
    assert flops.decoder_flops(3, 0, layers=2, hidden=8, intermediate=16, num_heads=2) == 2 * (3840 + 192)
    # 2 new tokens after 5 cached ones: pairs 2 x 5 + (1 + 2) = 13 -> 4 x 8 x 13 = 416; linear 2 x 640 x 2 = 2560.
    assert flops.decoder_flops(2, 5, layers=2, hidden=8, intermediate=16, num_heads=2) == 2 * (2560 + 416)
    # full (non-causal) matrix: 3 x 3 = 9 pairs
    assert flops.decoder_flops(3, 0, layers=1, hidden=8, intermediate=16, num_heads=2, causal=False) == 3840 + 4 * 8 * 9
    # grouped-query attention: k and v shrink to 1 head of 4 -> 2 x 8 x 8 + 2 x 8 x 4 + 384 = 576
    assert flops.decoder_layer_matmul_params(8, 16, 2, 1, 4) == 576


def test_decoder_params_are_those_of_a_real_llama_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2)
    layer = LlamaDecoderLayer(config, layer_idx=0)
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert flops.decoder_layer_matmul_params(48, 80, 6, 2, 8) == linear


def test_decoder_flops_match_torch_flop_counter():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
    )
    model = LlamaModel(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.zeros(1, 10, dtype=torch.long), use_cache=False)
    # eager attention computes the full 10 x 10 score matrix; rotary's tiny matmul is the only extra
    expected = flops.decoder_flops(10, 0, layers=2, hidden=64, intermediate=96, num_heads=4, num_kv_heads=2, causal=False)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-2)


def test_clip_and_sam_flops_at_the_real_dimensions_match_torch_flop_counter():
    """On the meta device: LLaVA-1.5-7B's CLIP ViT-L/14-336 and SAM ViT-H, exact FLOP counts."""
    from segment_anything import sam_model_registry
    from transformers import CLIPVisionModel

    config = real_configs.llava_1_5_7b_config(32000, 32001)
    with torch.device("meta"):
        clip = CLIPVisionModel._from_config(config.vision_config, attn_implementation="eager")
        with FlopCounterMode(display=False) as counter:
            clip(pixel_values=torch.empty(1, 3, 336, 336))
    assert counter.get_total_flops() == flops.clip_vision_flops(config.vision_config)

    with torch.device("meta"):
        sam = sam_model_registry["vit_h"](checkpoint=None)
        with FlopCounterMode(display=False) as counter:
            sam.image_encoder(torch.empty(1, 3, 1024, 1024))
    shape = flops.SamEncoderShape.of(sam.image_encoder)
    assert (shape.dim, len(shape.window_sizes), shape.window_sizes.count(0)) == (1280, 32, 4)
    assert counter.get_total_flops() == flops.sam_encoder_flops(shape)
    assert 5.9e12 < flops.sam_encoder_flops(shape) < 6.0e12  # ~2.98 TMAC


def test_llava_7b_config_has_the_real_size():
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(real_configs.llava_1_5_7b_config(32000, 32001))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.06e9, rel=2e-3)


def test_word_tokenizer_uses_llava_ids():
    tokenizer = real_configs.build_word_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<image>") == 32000 and tokenizer.pad_token_id == 32001
    ids = tokenizer("USER: <image><image>\nthe red circle ASSISTANT:")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(32000) == 2 and max(ids) < 32064


def test_gpu_peak_table():
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3") == (989e12, "H100 SXM")
    assert flops.gpu_peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert flops.gpu_peak_flops("NVIDIA H200")[0] == 989e12
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert flops.gpu_peak_flops("Some Future GPU") == (None, "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_real_scale_without_a_gpu_says_so(bench):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--scale", "real"])


def test_tiny_run_end_to_end(bench, tmp_path, capsys):
    from lens_cache.build import first_images
    from lens_manifests import build_manifest
    from lens_manifests.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, seed=0, num_train_images=1, num_val_images=2, num_test_images=1, workers=1)
    result = bench.main(
        ["--scale", "tiny", "--images", "2", "--data-root", str(data), "--warmup-images", "1", "--out", str(tmp_path / "r.json")]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result == json.loads((tmp_path / "r.json").read_text())

    manifest = first_images(build_manifest("synthetic:val", data), 2)
    assert result["images"] == 2 and result["queries"] == manifest.num_rows
    for key in ("build_images_per_s", "build_queries_per_s", "naive_queries_per_s", "peak_flops",
                "ceiling_images_per_s", "ceiling_queries_per_s", "build_mfu", "flops_per_query_mean"):
        assert result[key] > 0, key
    assert result["bytes_per_image"] > result["bytes_per_query"] > 0
    assert result["build_queries_per_s"] == pytest.approx(
        result["build_images_per_s"] * result["queries"] / result["images"], rel=1e-3
    )
    per_image = result["flops_per_image"]
    assert per_image["total"] == sum(v for k, v in per_image.items() if k != "total")
    assert result["flops_build_total"] == pytest.approx(
        2 * per_image["total"] + result["queries"] * result["flops_per_query_mean"], rel=1e-6
    )
    # the naive baseline redoes the image work for each query, over all 32 layers
    assert result["flops_naive_per_query_mean"] > per_image["total"]
    assert result["ceiling_images_per_s"] == pytest.approx(
        result["peak_flops"] * result["images"] / result["flops_build_total"], rel=1e-3
    )
    sizes = result["bytes_by_array"]
    assert sizes["images/sam"] > 0 and sizes["images/mllm_l14"] > 0 and sizes["queries/text_l14"] > 0
