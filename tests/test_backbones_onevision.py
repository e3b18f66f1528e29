"""What only the LLaVA-OneVision adapter has (tiny, CPU, float32): the AnyRes tile beside the cached base grid,
the grid's positions proven against the vision tower + projector, the layout check, the attention probe, the
presets and a CLI store that trains a grid-27 head; the contract every adapter keeps (states equal a full forward,
prefix sharing, early stop, identity, warm start, loading) is tests/test_backbones_contract.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lens_cache.backbones.onevision import ONEVISION_TEMPLATE, OnevisionBackbone
from lens_cache.backbones.tiny_onevision import build_tiny_onevision
from lens_core.head import SegmentationHead
from lens_train.training.presets import PRESET_DIR, load_preset
from tests.helpers.backbones import ATOL
from tests.helpers.images import padded_squares

LAYERS = (20, 27)  # two layers of the 28 (the onevision-7b preset trains on 14: tests/test_cache_fidelity_backbones.py)
GRID, BASE, RUN = 27, 729, 729 + 27 * 28  # grid side, base-grid tokens, image tokens in the LM sequence

QUESTIONS_A = [
    "Can you segment the red circle in this image?",
    "What object in this picture would someone use to carry water on a long walk?",
]
QUESTIONS_B = ["Which shape is left of the blue square?"]


@pytest.fixture(scope="module")
def backbone() -> OnevisionBackbone:
    """The ``anyres`` way (the processor's 1485-token layout); the default ``base`` way (the authors') is
    tested against its own full forward in tests/test_cache_fidelity_backbones.py."""
    return OnevisionBackbone.tiny(layers=LAYERS, device="cpu", dtype=torch.float32, image_tokens="anyres")


@pytest.fixture(scope="module")
def squares() -> list[Image.Image]:
    """Two non-square images brought into SAM's padded square, as the extractor feeds the MLLM."""
    return padded_squares()


def _reference(backbone, square: Image.Image, question: str):
    """Plain full forward of the whole prompt through the processor's own inputs:
    (inputs, positions of the <image> run, hidden_states)."""
    inputs = backbone.processor(text=backbone.prompt_for(question), images=backbone.model_image(square),
                                return_tensors="pt")
    with torch.inference_mode():
        out = backbone.model(**inputs, output_hidden_states=True)
    run = (inputs["input_ids"][0] == backbone.model.config.image_token_id).nonzero()[:, 0]
    return inputs, run, out.hidden_states


@pytest.fixture(scope="module")
def reference(backbone, squares):
    """The full forward of the second image and its question (:func:`_reference`), computed once."""
    return _reference(backbone, squares[1], QUESTIONS_B[0])


def test_the_anyres_tile_holds_other_states_than_the_cached_base_grid(reference):
    """The contract test proves the cached states are the first 729 of the run (the base grid); the duplicate
    tile later in the run (the same pixels) holds other states at layer k (its own place in the sequence)."""
    _, run, hidden = reference
    assert len(run) == RUN
    for k in LAYERS:
        tile = hidden[k][0, run[BASE:]].reshape(GRID, GRID + 1, -1)[:, :GRID].reshape(BASE, -1)
        assert (hidden[k][0, run[:BASE]] - tile).abs().max() > 100 * ATOL


def test_grid_positions_are_the_projectors_base_features(backbone, squares, reference):
    """Which of the 1485 <image> positions hold the 27 x 27 base grid, proven against the vision tower
    + projector run on their own: the first 729 (row-major); then the 1 x 1 AnyRes tile, the same
    crop again, as 27 rows of 27 tokens each followed by image_newline."""
    model = backbone.model.model
    inputs, run, hidden = reference
    assert torch.equal(backbone._grid_positions, run[:BASE])
    pixels = inputs["pixel_values"][0]
    assert pixels.shape == (2, 3, 384, 384) and torch.equal(pixels[0], pixels[1])  # base crop, tile crop
    # the crop is SAM's square at 378 px, zero-padded to 384: the 27 x 14 px patches tile SAM's frame exactly
    frame = np.asarray(squares[1].resize((378, 378), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy((frame / 255 - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(pixels[0][:, :378, :378], expected, atol=1e-5, rtol=0)
    assert bool((pixels[0][:, 378:, :] == -1).all() and (pixels[0][:, :, 378:] == -1).all())
    with torch.inference_mode():
        vision = model.vision_tower(pixels[:1], output_hidden_states=True)
        base = model.multi_modal_projector(vision.hidden_states[-1])[0]  # (729, d): SigLIP's patches, row-major
    assert base.shape == (BASE, 64)
    embeds = hidden[0][0]  # the LM's input embeddings
    torch.testing.assert_close(embeds[run[:BASE]], base, atol=1e-6, rtol=0)
    tile = embeds[run[BASE:]].reshape(GRID, GRID + 1, -1)
    torch.testing.assert_close(tile[:, :GRID].reshape(BASE, -1), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(tile[:, GRID], model.image_newline.expand(GRID, -1), atol=0, rtol=0)
    assert (base[1:] - base[:-1]).abs().amax(-1).min() > 0  # no two neighbours alike: the order is tested


def test_image_token_count_check(backbone, squares, monkeypatch):
    """Another layout than 729 + 27 x 28 is a one-line error naming the settings to change."""
    from lens_cache.backbones import onevision

    def two_by_two(model, processor, side):  # a 2 x 2 AnyRes grid instead of the base resolution
        model.config.image_grid_pinpoints = processor.image_processor.image_grid_pinpoints = [[768, 768]]

    monkeypatch.setattr(onevision, "configure_base_resolution", two_by_two)
    model, processor = build_tiny_onevision()
    with pytest.raises(ValueError) as err:
        OnevisionBackbone(model, processor, name_or_path="tiny", layers=LAYERS, image_tokens="anyres")
    message = str(err.value)
    assert "\n" not in message and "3699 image tokens from 5 crops" in message and "not 1485" in message
    assert "set image_grid_pinpoints to [[384, 384]]" in message
    monkeypatch.undo()
    # the 'default' feature strategy drops one patch per crop: 1484 tokens
    model, processor = build_tiny_onevision()
    processor.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match=r"1484 image tokens from 2 crops, not 1485 .* vision_feature_select_strategy"):
        OnevisionBackbone(model, processor, name_or_path="tiny", layers=LAYERS, image_tokens="anyres")
    # at encode time, when the processor is changed after construction
    model, processor = build_tiny_onevision()
    changed = OnevisionBackbone(model, processor, name_or_path="tiny", layers=LAYERS, image_tokens="anyres")
    processor.image_processor.image_grid_pinpoints = [[384, 768]]
    with pytest.raises(ValueError, match=r"crops of shape \(3, 3, 384, 384\).*set image_grid_pinpoints"):
        changed.encode(squares[:1], [QUESTIONS_B])


def test_image_attention_by_layer(backbone, squares):
    """(layers, 27, 27): the last token's attention to the base grid, = an eager full forward's attentions."""
    question = backbone.question_for("red circle", is_sentence=False)
    maps = backbone.image_attention_by_layer(squares[0], question)
    assert maps.shape == (28, GRID, GRID) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all() and (maps.sum((1, 2)) < 1).all()
    inputs = backbone.processor(text=backbone.prompt_for(question), images=backbone.model_image(squares[0]),
                                return_tensors="pt")
    run = (inputs["input_ids"][0] == backbone.image_token_id).nonzero()[:, 0]
    from lens_cache.backbones.layer_capture import eager_attention

    with eager_attention(backbone.model), torch.inference_mode():
        out = backbone.model(**inputs, output_attentions=True)
    for layer in (0, 20, 27):
        expected = out.attentions[layer][0, :, -1, run[:BASE]].mean(0).reshape(GRID, GRID)
        torch.testing.assert_close(maps[layer], expected, atol=1e-6, rtol=0)


def test_prompt_tokens_and_identity_of_the_anyres_way(backbone):
    """The processor's chat template renders the default template; the prompt is two tokens then the 1485-token
    run; the AnyRes way's identity and geometry (the contract test checks the fields they share)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    rendered = backbone.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == ONEVISION_TEMPLATE.replace("{question}", "Q?") == backbone.prompt_for("Q?")
    prefix, suffix = backbone._split_ids(QUESTIONS_A[0])
    tokens = backbone.processor.tokenizer.convert_ids_to_tokens(prefix[:2] + suffix[-3:])
    assert tokens == ["<|im_start|>", "user", "<|im_end|>", "<|im_start|>", "assistant"]
    assert len(prefix) == 2 + RUN and prefix[2:] == [backbone.image_token_id] * RUN
    ident = backbone.identity
    assert ident["num_image_tokens"] == BASE and ident["grid_size"] == GRID
    assert ident["image_grid_pinpoints"] == [[384, 384]] and ident["hidden_size"] == 64
    assert backbone.image_geometry == "sam-pad-1024-to-378-pad-384" and "image_tokens" not in ident
    with pytest.raises(ValueError, match="image_tokens"):
        OnevisionBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=LAYERS, image_tokens="tiles")


@pytest.mark.parametrize("name, layers, grid", [("onevision-7b", (14, 27), 27), ("qwen25vl-3b", (26, 35), 24)])
def test_presets_fit_the_real_decoder_layers(name, layers, grid):
    """The presets' heads are the real text models' decoder layers (sizes as recorded in each preset's
    description): the layers load strictly into the preset's head on the meta device, and the adapters'
    head_sizes equal the preset's fields."""
    from types import SimpleNamespace

    preset = load_preset(name)
    assert (preset.main_layer, preset.late_layer) == layers
    assert preset.model.grid_size == grid and preset.model.num_image_tokens == grid * grid
    assert "not checked" in preset.description.lower() or "NOT checked" in preset.description
    if name == "onevision-7b":
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as Layer

        text = Qwen2Config(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        sizes = OnevisionBackbone.head_sizes.fget(SimpleNamespace(text_config=text))
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer as Layer

        from lens_cache.backbones.qwen2vl import Qwen2VLBackbone

        text = Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                      num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        sizes = Qwen2VLBackbone.head_sizes.fget(SimpleNamespace(text_config=text))
    assert layers[1] == text.num_hidden_layers - 1
    assert {key: getattr(preset.model, key) for key in sizes} == sizes
    with torch.device("meta"):
        decoder = [Layer(text, i) for i in (layers[0], layers[0] + 1)]
        head = SegmentationHead(config=preset.model)
    head.load_decoder_layers([layer.state_dict() for layer in decoder])  # strict: every name and shape
    final_norm = preset.model.hidden_size if preset.model.final_norm else 0  # the authors' head keeps its model's norm
    assert sum(p.numel() for p in head.parameters()) == 2 * sum(p.numel() for p in decoder[0].parameters()) + final_norm


def test_cli_store_of_tiny_onevision_trains_a_grid27_head(tmp_path):
    """End to end through the CLIs: `lens-cache build --mllm tiny-onevision` (tiny SAM, 2 synthetic images)
    records 729 image tokens on a 27 grid and Qwen2 warm-start layers; `lens-train` with a grid-27 Qwen2
    preset warm-starts from them and trains 2 steps."""
    from typer.testing import CliRunner

    from lens_cache.cli import app as cache_app
    from lens_cache.store import FeatureStore
    from lens_manifests.synthetic import write_synthetic
    from lens_train.cli import train_app
    from lens_train.training.loading import load_run

    runner = CliRunner()
    write_synthetic(tmp_path / "data", seed=0, num_train_images=1, num_val_images=2, num_test_images=1, workers=1)
    store_dir = tmp_path / "store"
    result = runner.invoke(cache_app, [
        "build", "--split", "synthetic-refer:val", "--data-root", str(tmp_path / "data"), "--out", str(store_dir),
        "--mllm", "tiny-onevision", "--sam", "tiny", "--layers", "20", "--limit", "2", "--block-size", "1",
        "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(store_dir)
    assert store.num_images == 2 and store.num_image_tokens == BASE
    assert store.identity["grid_size"] == GRID and store.identity["backbone"] == "llava-onevision"
    assert store.identity["image_geometry"] == "sam-pad-1024-to-384"  # the default: the authors' base way
    assert store.identity["image_tokens"] == "base" and "image_grid_pinpoints" not in store.identity
    assert store.warm_start["head"]["layer_type"] == "qwen2"
    sample = store.read_query(0, 20)
    assert sample["image_states"].shape == (BASE, 64)

    preset = json.loads((PRESET_DIR / "tiny.json").read_text())
    preset.pop("synthetic", None)
    preset["layers"] = {"main": 20, "late": 27}
    preset["model"].update(hidden_size=64, num_heads=4, num_key_value_heads=2, mlp_size=128, rms_norm_eps=1e-6,
                           rope_theta=1e6, layer_type="qwen2", grid_size=GRID)
    (tmp_path / "onevision-tiny.json").write_text(json.dumps(preset))
    run = tmp_path / "run"
    result = runner.invoke(train_app, [
        "--cache", str(store_dir), "--preset", str(tmp_path / "onevision-tiny.json"), "--out", str(run),
        "--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--warmup-steps", "1", "--workers", "0",
        "--log-every", "1", "--warm-start", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 2
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert load_run(run).model.config.grid_size == GRID
    warm = json.loads((run / "config.json").read_text())["warm_start"]
    assert warm["used"] is True and warm["layers"] == [20, 21]
    from lens_train.cli import eval_app

    result = runner.invoke(eval_app, ["--checkpoint", str(run), "--cache", str(store_dir), "--out", str(tmp_path / "eval"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_queries"] == store.num_queries and 0.0 <= metrics["giou"] <= 1.0


def test_adapters_register_through_entry_points_not_the_registry_module():
    """A backbone is its own module declared under the entry-point group: the registry module names none."""
    from importlib.metadata import entry_points

    import lens_cache.backbones as registry
    from pathlib import Path

    declared = {e.name: e.value for e in entry_points(group=registry.ADAPTER_ENTRY_POINTS)}
    assert declared == {"qwen2vl": "lens_cache.backbones.qwen2vl", "onevision": "lens_cache.backbones.onevision"}
    source = Path(registry.__file__).read_text()
    assert "qwen2vl" not in source.split("def build_mllm")[0].split('"""', 2)[2]  # no import of an adapter by name
    assert {"qwen2_vl", "qwen2_5_vl", "llava_onevision"} <= set(registry.MLLM_ADAPTERS)
