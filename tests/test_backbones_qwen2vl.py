"""What only the Qwen2-VL adapter has (tiny, CPU, float32): Qwen2.5-VL on the same code path, M-RoPE positions,
the chat template, the image-size check, the preset and a store that trains; the contract every adapter keeps
(states equal a full forward, prefix sharing, early stop, identity, warm start, loading) is
tests/test_backbones_contract.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lens_cache.backbones import build_extractor
from lens_cache.backbones.qwen2vl import QWEN2_VL_TEMPLATE, Qwen2VLBackbone, mrope_positions
from lens_cache.backbones.tiny_qwen2vl import build_tiny_qwen2vl
from lens_core import LensConfig
from lens_core.head import SegmentationHead
from lens_train.training.presets import load_preset
from tests.helpers.backbones import ATOL, check_against_full_forward
from tests.helpers.images import padded_squares

LAYERS = (20, 27)  # Qwen2-VL-2B's main and late layers (28 decoder layers)

QUESTIONS_A = [
    "Can you segment the red circle in this image?",
    "What object in this picture would someone use to carry water on a long walk?",
]
QUESTIONS_B = ["Can you segment the green triangle in this image?"]


@pytest.fixture(scope="module")
def backbone() -> Qwen2VLBackbone:
    return Qwen2VLBackbone.tiny(layers=LAYERS, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def squares() -> list[Image.Image]:
    """Two non-square images brought into SAM's padded square, as the extractor feeds the MLLM."""
    return padded_squares()


def test_qwen25vl_shares_the_code_path(squares):
    """Qwen2.5-VL (other vision tower, same M-RoPE for still images): the same adapter, the same equality."""
    qwen25 = Qwen2VLBackbone.tiny(layers=LAYERS, device="cpu", dtype=torch.float32, family="qwen2_5_vl")
    assert qwen25.identity["backbone"] == "qwen2.5-vl" and qwen25.num_image_tokens == 576
    encoded = qwen25.encode(squares, [QUESTIONS_A, QUESTIONS_B])
    check_against_full_forward(qwen25, squares, [QUESTIONS_A, QUESTIONS_B], encoded, LAYERS, run_length=576)


def test_mrope_positions_are_the_models(backbone):
    """The adapter's own M-RoPE ids equal the model's get_rope_index on a whole prompt."""
    inputs = backbone.processor(text=backbone.prompt_for(QUESTIONS_A[0]), images=Image.new("RGB", (1024, 1024)),
                                return_tensors="pt")
    ids = inputs["input_ids"]
    expected, _ = backbone.model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                                      image_grid_thw=inputs["image_grid_thw"])
    before = backbone._text_before_image
    ours = mrope_positions(before, 24, ids.shape[1] - before - 576)
    assert torch.equal(ours, expected[:, 0])
    assert ours[:, before + 576].tolist() == [before + 24] * 3  # the text after the image restarts at a + 24


def test_prompt_is_qwen2vl_chat_template(backbone):
    """The processor's chat template renders the default template (the contract test checks the ids)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    rendered = backbone.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == QWEN2_VL_TEMPLATE.replace("{question}", "Q?") == backbone.prompt_for("Q?")
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    _, suffix = backbone._split_ids(QUESTIONS_A[0])
    assert backbone.processor.tokenizer.convert_ids_to_tokens(suffix)[0] == "<|vision_end|>"


def test_image_token_count_check(backbone, squares, monkeypatch):
    """A processor that does not give 24 x 24 tokens is a one-line error naming the setting."""
    from lens_cache.backbones import qwen2vl

    with pytest.raises(ValueError, match=r"image_size 690 must be a multiple of .* = 28"):
        Qwen2VLBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=LAYERS, image_size=690)
    # a processor left at its own size (min_pixels / max_pixels not set): 1024 px -> 980 px -> 35 x 35 tokens
    _, processor = build_tiny_qwen2vl()
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    monkeypatch.setattr(qwen2vl, "configure_image_size", lambda processor, size: None)
    with pytest.raises(ValueError) as err:
        Qwen2VLBackbone(backbone.model, processor, name_or_path="tiny", layers=LAYERS)
    message = str(err.value)
    assert "\n" not in message and "1225 image tokens" in message and "24 x 24 = 576" in message
    assert "set image_size" in message and "min_pixels = max_pixels" in message
    monkeypatch.undo()
    # the same check at encode time, when the processor is changed after construction
    changed = Qwen2VLBackbone(backbone.model, processor, name_or_path="tiny", layers=LAYERS)
    processor.image_processor.size = {"shortest_edge": 448 * 448, "longest_edge": 448 * 448}
    with pytest.raises(ValueError, match=r"256 image tokens .* not 24 x 24 = 576: set image_size"):
        changed.encode(squares[:1], [QUESTIONS_B])
    # another image size is another grid, and another identity
    small = Qwen2VLBackbone(backbone.model, build_tiny_qwen2vl()[1], name_or_path="tiny", layers=LAYERS, image_size=448)
    assert small.num_image_tokens == 256 and small.identity["image_size"] == 448
    assert small.image_geometry == "sam-pad-1024-to-448"


def test_the_heads_1d_positions_are_not_the_mllms_mrope(backbone):
    """The head runs the warm-start layer with 1-D positions 0..L-1 (text-only M-RoPE, as the contract test checks
    against the head); inside the MLLM the same layer sees 2-D image positions, and computes something else."""
    lm = backbone.model.model.language_model
    k, length = LAYERS[0], 576 + 12
    x = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    flat = torch.arange(length)[None, None].expand(3, 1, length)
    before = backbone._text_before_image
    mrope = mrope_positions(before, 24, length - 576)[:, None, before:]  # x starts at the image
    with torch.no_grad():
        ours = lm.layers[k](x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, flat))
        inside = lm.layers[k](x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, mrope))
    assert (ours - inside).abs().max() > 10 * ATOL


def test_qwen2vl_2b_preset_fits_the_real_decoder_layers():
    """presets/qwen2vl-2b.json is Qwen2-VL-2B-Instruct's decoder: its layers load strictly into the
    preset's head (meta device, real sizes) and the adapter's head_sizes equal the preset's fields."""
    from types import SimpleNamespace

    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

    preset = load_preset("qwen2vl-2b")
    assert (preset.main_layer, preset.late_layer) == (20, 27)
    assert (preset.train.lr, preset.train.batch_size, preset.train.grad_accum) == (5e-5, 2, 4)
    text = Qwen2VLTextConfig(  # Qwen2-VL-2B-Instruct's config.json
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    sizes = Qwen2VLBackbone.head_sizes.fget(SimpleNamespace(text_config=text))
    assert {key: getattr(preset.model, key) for key in sizes} == sizes
    assert preset.model.num_image_tokens == 576
    with torch.device("meta"):
        layers = [Qwen2VLDecoderLayer(text, i) for i in (20, 21)]
        head = SegmentationHead(config=preset.model)
    head.load_decoder_layers([layer.state_dict() for layer in layers])  # strict: every name and shape
    final_norm = preset.model.hidden_size if preset.model.final_norm else 0  # the authors' head keeps its model's norm
    assert sum(p.numel() for p in head.parameters()) == 2 * sum(p.numel() for p in layers[0].parameters()) + final_norm


@pytest.mark.parametrize("mllm", ["tiny-qwen2vl", "tiny-qwen25vl"])
def test_cache_built_with_qwen2vl_warm_starts_a_qwen2_head_only(tmp_path, toy_sam_file, mllm):
    """End to end through a store: a cache of the tiny Qwen2-VL (one image, one query) records Qwen2
    decoder layers; a Qwen2 head reads them and its first layer is the MLLM's layer k on the cached
    states; a LLaMA head (every preset before) is refused with the setting that differs."""
    from lens_cache.build import build_cache
    from lens_manifests import build_manifest
    from lens_train.errors import UserError
    from lens_train.training.stores import read_warm_start
    from lens_train.testing import small_synthetic

    root = small_synthetic(tmp_path / "synthetic", images=2)
    manifest = build_manifest("synthetic-reason:val", root).take([0])
    extractor = build_extractor(mllm=mllm, sam=f"toy:{toy_sam_file}", layers=(20,), device="cpu")
    store = build_cache(manifest, tmp_path / "store", lambda: extractor, spec="synthetic-reason:val",
                        batch_size=1, progress=False)
    record = store.warm_start["head"]
    assert record["layer_type"] == "qwen2" and record["num_key_value_heads"] == 2
    assert store.identity["image_geometry"] == "sam-pad-1024-to-672" and store.num_image_tokens == 576
    tiny = load_preset("tiny").model
    cfg = LensConfig.from_dict({**tiny.to_dict(), **record})
    warm = read_warm_start(store, layer=20, config=cfg)
    assert warm.layers == (20, 21) and warm.notes == ()
    head = SegmentationHead(config=cfg).eval()
    head.load_decoder_layers(warm.state_dicts)
    sample = store.read_query(0, 20)
    x = torch.cat([torch.from_numpy(sample["image_states"]), torch.from_numpy(sample["text_states"])]).float()[None]
    lm = extractor.mllm.model.model.language_model
    length = x.shape[1]
    flat = torch.arange(length)[None, None].expand(3, 1, length)
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = lm.layers[20](x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, flat))
        ours, _ = head.layers[0](x, *head.rotary(torch.arange(length)))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    llama = LensConfig.from_dict({**tiny.to_dict(), "rms_norm_eps": 1e-6, "rope_theta": 1e6})
    with pytest.raises(UserError) as err:
        read_warm_start(store, layer=20, config=llama)
    assert "layer_type qwen2 (preset: llama), num_key_value_heads 2 (preset: 4)" in str(err.value)

    # ... and trains and evaluates end to end with a Qwen2 preset of the tiny model's shape
    from lens_train.evaluation.evaluate import evaluate
    from lens_train.training.trainer import TrainRequest, train

    overrides = {**record, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "prompt_dim": store.sam_channels}
    train(TrainRequest(caches=(store.url,), out=tmp_path / "run", preset="tiny", model_overrides=overrides, layer=20,
                       train_overrides={"steps": 2, "batch_size": 1, "grad_accum": 1, "num_workers": 0,
                                        "warmup_steps": 1}, sam=f"toy:{toy_sam_file}", device="cpu", quiet=True))
    metrics = evaluate(tmp_path / "run", store.url, out=tmp_path / "eval", sam=f"toy:{toy_sam_file}",
                       log=lambda line: None)
    assert metrics["num_queries"] == 1 and 0.0 <= metrics["giou"] <= 1.0
