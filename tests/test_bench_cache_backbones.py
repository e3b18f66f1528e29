"""benchmarks/bench_cache.py --backbone qwen2vl-2b | onevision-7b: the vision-side FLOP counts (lens_cache.flops)
against torch's FlopCounterMode, the real-size configs' parameter counts (lens_cache.backbones.real_configs, meta
device), and a tiny CPU run of each."""

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


def test_siglip_flops_at_the_real_dimensions_match_torch_flop_counter():
    """On the meta device: LLaVA-OneVision-7B's SigLIP-so400m at 384 px (27 x 27 patches), exact."""
    from transformers import SiglipVisionModel
    from lens_cache.backbones.tiny_onevision import build_tiny_onevision_tokenizer

    config = real_configs.onevision_7b_config(build_tiny_onevision_tokenizer())
    with torch.device("meta"):
        siglip = SiglipVisionModel._from_config(config.vision_config, attn_implementation="eager")
        with FlopCounterMode(display=False) as counter:
            siglip(pixel_values=torch.empty(1, 3, 384, 384))
    assert counter.get_total_flops() == flops.siglip_vision_flops(config.vision_config)


def test_qwen2vl_vision_and_merger_flops_match_torch_flop_counter():
    """The tiny Qwen2-VL's vision tower (real classes) on one 672 px image: 48 x 48 patches, merged to 24 x 24."""
    from lens_cache.backbones.tiny_qwen2vl import build_tiny_qwen2vl

    model, processor = build_tiny_qwen2vl()
    model.set_attn_implementation("eager")
    pixels = processor.image_processor(images=[torch.zeros(3, 672, 672, dtype=torch.uint8)], return_tensors="pt")
    vision = model.config.vision_config
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    expected = flops.qwen2vl_vision_flops(vision, 48) + flops.qwen2vl_merger_flops(vision, 48)
    assert counter.get_total_flops() == expected


def test_real_configs_have_the_real_size():
    """Parameter counts of the models built from the real-scale configs (meta device) against the published
    sizes (Qwen2-VL-2B-Instruct 2.21B, LLaVA-OneVision-qwen2-7b 8.03B; from memory of the model cards)."""
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration
    from lens_cache.backbones.tiny_onevision import build_tiny_onevision_tokenizer
    from lens_cache.backbones.tiny_qwen2vl import build_tiny_qwen_tokenizer

    with torch.device("meta"):
        qwen = Qwen2VLForConditionalGeneration(real_configs.qwen2vl_2b_config(build_tiny_qwen_tokenizer()))
        onevision = LlavaOnevisionForConditionalGeneration(real_configs.onevision_7b_config(build_tiny_onevision_tokenizer()))
    assert sum(p.numel() for p in qwen.parameters()) == pytest.approx(2.21e9, rel=2e-3)
    assert sum(p.numel() for p in onevision.parameters()) == pytest.approx(8.03e9, rel=2e-3)


@pytest.mark.parametrize("backbone, prefix_tokens", [("qwen2vl-2b", None), ("onevision-7b", 2 + 729)])
def test_tiny_run_of_each_backbone(bench, tmp_path, capsys, backbone, prefix_tokens):
    from lens_manifests.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, seed=0, num_train_images=1, num_val_images=2, num_test_images=1, workers=1)
    result = bench.main(["--scale", "tiny", "--backbone", backbone, "--images", "2", "--data-root", str(data),
                         "--warmup-images", "1", "--threads", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["backbone"] == backbone and result["layers"] == [20] and result["images"] == 2
    assert result["mllm"].startswith(real_configs.REAL_BACKBONES[backbone].tiny)
    if prefix_tokens is not None:
        assert result["prefix_tokens"] == prefix_tokens
    per_image = result["flops_per_image"]
    assert per_image["total"] == sum(v for k, v in per_image.items() if k != "total") and per_image["vision_tower"] > 0
    assert result["flops_naive_per_query_mean"] > per_image["total"]
    assert result["build_queries_per_s"] > 0 and result["naive_queries_per_s"] > 0
    assert result["bytes_by_array"]["images/mllm_l20"] > 0 and result["bytes_by_array"]["queries/text_l20"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_real_scale_without_a_gpu_names_the_backbone(bench):
    with pytest.raises(SystemExit, match="needs a CUDA GPU \\(onevision-7b"):
        bench.main(["--scale", "real", "--backbone", "onevision-7b"])


def test_every_benchmarked_backbone_has_a_tiny_counterpart_and_a_defaults_row():
    from lens_cache.backbones.defaults import BUILTIN_DEFAULTS

    for name, row in real_configs.REAL_BACKBONES.items():
        assert row.tiny in BUILTIN_DEFAULTS, name
        assert BUILTIN_DEFAULTS[row.tiny].grid_size in (24, 27), name
