"""The Qwen2-VL adapter against a plain full forward of the real transformers classes (tiny, CPU, float32)."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from lens_cache.backbones import MLLM_ADAPTERS, BUILTIN_MLLMS, build_extractor, build_mllm
from lens_cache.backbones.mllm import UnsupportedMllmError
from lens_cache.backbones.qwen2vl import QWEN2_VL_TEMPLATE, Qwen2VLBackbone, mrope_positions
from lens_cache.backbones.tiny_qwen2vl import build_tiny_qwen2vl, save_tiny_qwen2vl
from lens_core import LensConfig
from lens_core.head import SegmentationHead
from lens_train.training.presets import load_preset
from tests.helpers.images import padded_squares, random_image

ATOL = 1e-5
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


@pytest.fixture(scope="module")
def encoded(backbone, squares):
    return backbone.encode(squares, [QUESTIONS_A, QUESTIONS_B])


def _reference(backbone, image: Image.Image, question: str):
    """Plain full forward of the whole prompt through the processor (the model computes its own
    M-RoPE positions with get_rope_index): (input_ids (S,), hidden_states)."""
    inputs = backbone.processor(text=backbone.prompt_for(question), images=image, return_tensors="pt")
    with torch.inference_mode():
        out = backbone.model(**inputs, output_hidden_states=True)
    return inputs["input_ids"][0], out.hidden_states


def _check_against_full_forward(backbone, squares, encoded, layers=LAYERS):
    for image, questions, states in zip(squares, [QUESTIONS_A, QUESTIONS_B], encoded):
        assert len(states.text_states) == len(questions)
        for question, text_states in zip(questions, states.text_states):
            input_ids, hidden = _reference(backbone, image, question)
            image_pos = (input_ids == backbone.model.config.image_token_id).nonzero()[:, 0]
            assert len(image_pos) == 576
            text_pos = torch.arange(int(image_pos[-1]) + 1, len(input_ids))
            assert text_states[layers[0]].shape[0] == len(text_pos) == backbone.num_text_tokens(question)
            for k in layers:
                torch.testing.assert_close(states.image_states[k], hidden[k][0, image_pos], atol=ATOL, rtol=0)
                torch.testing.assert_close(text_states[k], hidden[k][0, text_pos], atol=ATOL, rtol=0)


def test_shared_prefix_states_equal_full_forward(backbone, squares, encoded):
    """THE key test: prefix once per image (two images batched, KV cache), each question's suffix alone
    with continued M-RoPE positions, right-padded == hidden_states[k] of a plain full forward."""
    assert backbone.num_text_tokens(QUESTIONS_A[0]) != backbone.num_text_tokens(QUESTIONS_A[1])  # padding exercised
    _check_against_full_forward(backbone, squares, encoded)


def test_qwen25vl_shares_the_code_path(squares):
    """Qwen2.5-VL (other vision tower, same M-RoPE for still images): the same adapter, the same equality."""
    qwen25 = Qwen2VLBackbone.tiny(layers=LAYERS, device="cpu", dtype=torch.float32, family="qwen2_5_vl")
    assert qwen25.identity["backbone"] == "qwen2.5-vl" and qwen25.num_image_tokens == 576
    encoded = qwen25.encode(squares, [QUESTIONS_A, QUESTIONS_B])
    _check_against_full_forward(qwen25, squares, encoded)


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


def test_prompt_is_qwen2vl_chat_template_and_tokens(backbone):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    rendered = backbone.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == QWEN2_VL_TEMPLATE.replace("{question}", "Q?") == backbone.prompt_for("Q?")
    assert backbone.prompt_template == QWEN2_VL_TEMPLATE
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    prefix, suffix = backbone._split_ids(QUESTIONS_A[0])
    image_token = backbone.model.config.image_token_id
    assert backbone.num_image_tokens == 576 and backbone.grid_size == 24
    assert sum(t == image_token for t in prefix) == 576 and prefix[-1] == image_token
    tokens = backbone.processor.tokenizer.convert_ids_to_tokens(suffix)
    assert tokens[0] == "<|vision_end|>" and tokens[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]
    full = backbone.processor(text=backbone.prompt_for(QUESTIONS_A[0]), images=Image.new("RGB", (1024, 1024)))
    assert list(full["input_ids"][0]) == prefix + suffix
    for special in ("<|image_pad|>", "<|im_end|>"):
        with pytest.raises(ValueError, match="special token"):
            backbone.num_text_tokens(f"What is {special} here?")


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


def test_warm_start_layers_load_strictly_into_a_qwen2_head(backbone, encoded):
    """Layers k, k+1 load strictly into a head configured as Qwen2 (biases, GQA); its first layer computes
    the backbone's layer k on the cached layer-k states with 1-D positions 0..L-1 (text-only M-RoPE)."""
    extractor = build_extractor(mllm="tiny-qwen2vl", sam="tiny", layers=LAYERS, device="cpu")
    k = LAYERS[0]
    sizes, state_dicts = extractor.decoder_layers([k, k + 1])
    assert sizes == backbone.head_sizes
    assert sizes["layer_type"] == "qwen2" and sizes["num_key_value_heads"] == 2 and sizes["rope_theta"] == 1e6
    assert "self_attn.q_proj.bias" in state_dicts[0] and "self_attn.o_proj.bias" not in state_dicts[0]
    cfg = LensConfig.from_dict({**load_preset("tiny").model.to_dict(), **sizes})
    head = SegmentationHead(config=cfg).eval()
    head.load_decoder_layers(state_dicts)  # strict
    llama_head = SegmentationHead(config=load_preset("tiny").model)
    with pytest.raises(RuntimeError):
        llama_head.load_decoder_layers(state_dicts)

    states = encoded[0]
    x = torch.cat([states.image_states[k], states.text_states[0][k]])[None]
    length = x.shape[1]
    lm = backbone.model.model.language_model
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    flat = torch.arange(length)[None, None].expand(3, 1, length)
    with torch.no_grad():
        expected = lm.layers[k](x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, flat))
        ours, _ = head.layers[0](x, *head.rotary(torch.arange(length)))
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-5)
        # ... which is not what the layer computes inside the MLLM, with its 2-D image positions
        before = backbone._text_before_image
        mrope = mrope_positions(before, 24, length - 576)[:, None, before:]  # x starts at the image
        inside = lm.layers[k](x, attention_mask=mask, position_embeddings=lm.rotary_emb(x, mrope))
        assert (ours - inside).abs().max() > 10 * ATOL  # random tiny weights: small, but far above ATOL
        out = head(states.image_states[k][None], states.text_states[0][k][None],
                   torch.tensor([states.text_states[0][k].shape[0]]))
    assert out.heatmap.shape == (1, 24, 24) and torch.isfinite(out.heatmap).all()


def test_registry_presets_adapters_and_identity(backbone, squares, encoded):
    assert "tiny-qwen2vl" in BUILTIN_MLLMS and {"qwen2_vl", "qwen2_5_vl"} <= set(MLLM_ADAPTERS)
    ident = backbone.identity
    assert ident["backbone"] == "qwen2-vl" and ident["layers"] == list(LAYERS)
    assert ident["num_image_tokens"] == 576 and ident["image_size"] == 672 and ident["hidden_size"] == 64
    assert ident["prompt_template"] == QWEN2_VL_TEMPLATE
    extractor = build_extractor(mllm="tiny-qwen2vl", sam="tiny", layers=LAYERS, device="cpu")
    assert extractor.identity["image_geometry"] == "sam-pad-1024-to-672"
    assert (extractor.layers, extractor.hidden_size, extractor.num_image_tokens) == (LAYERS, 64, 576)
    features = extractor.extract([random_image(0, 300, 500)], [QUESTIONS_A[:1]])[0]
    torch.testing.assert_close(features.image_states[27], encoded[0].image_states[27], atol=ATOL, rtol=0)
    assert features.sam_embedding.shape == (256, 64, 64)
    with pytest.raises(ValueError, match="layers"):
        Qwen2VLBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=(29,))


def test_saved_tiny_loads_through_real_loader(tmp_path, backbone, squares, encoded):
    folder = save_tiny_qwen2vl(tmp_path / "tiny-qwen2vl")
    loaded = build_mllm(str(folder), layers=LAYERS, device="cpu")
    assert isinstance(loaded, Qwen2VLBackbone) and loaded.model.dtype == torch.float32
    assert loaded.identity["config_hash"] == backbone.identity["config_hash"]
    assert loaded.identity["weights_fingerprint"] == backbone.identity["weights_fingerprint"]
    assert loaded.prompt_template == QWEN2_VL_TEMPLATE  # from the saved chat template
    assert loaded.num_image_tokens == 576  # the saved processor's own size is replaced by 672 x 672
    again = loaded.encode(squares, [QUESTIONS_A, QUESTIONS_B])
    for a, b in zip(again, encoded):
        for k in LAYERS:
            torch.testing.assert_close(a.image_states[k], b.image_states[k], atol=0, rtol=0)
            for ta, tb in zip(a.text_states, b.text_states):
                torch.testing.assert_close(ta[k], tb[k], atol=0, rtol=0)
    with pytest.raises(UnsupportedMllmError, match="not a Qwen2-VL"):
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(tmp_path / "llama")
        Qwen2VLBackbone.from_pretrained(str(tmp_path / "llama"))


def test_generate_and_model_untouched(backbone, squares):
    before = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    lm = backbone.model.model.language_model
    hooks_before = [len(layer._forward_hooks) for layer in lm.layers]
    answer = backbone.generate(random_image(2, 200, 100), "What is in this image?", max_new_tokens=3, min_new_tokens=2)
    assert isinstance(answer, str)
    assert isinstance(backbone.generate(None, "Is this a question?", max_new_tokens=2, min_new_tokens=1), str)
    deeper: list[int] = []
    handle = lm.layers[LAYERS[-1]].register_forward_hook(lambda m, a, o: deeper.append(1))
    try:
        again = backbone.encode(squares[:1], [QUESTIONS_B])[0]  # after generate (which sets rope_deltas)
    finally:
        handle.remove()
    assert deeper == []  # the forward stopped after decoder layer 26
    input_ids, hidden = _reference(backbone, squares[0], QUESTIONS_B[0])
    image_pos = (input_ids == backbone.model.config.image_token_id).nonzero()[:, 0]
    torch.testing.assert_close(again.text_states[0][27], hidden[27][0, int(image_pos[-1]) + 1:], atol=ATOL, rtol=0)
    for name, p in backbone.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None and not p.requires_grad
    assert [len(layer._forward_hooks) for layer in lm.layers] == hooks_before
    assert not again.image_states[20].is_inference() and again.image_states[20].dtype == torch.float32


def test_registry_import_stays_light():
    """The registry imports the Qwen2-VL module, which must not import transformers (stage 2 imports
    lens_cache.backbones.sam without it)."""
    import subprocess

    code = ("import sys, lens_cache.backbones as b; "
            "assert 'tiny-qwen2vl' in b.BUILTIN_MLLMS and 'qwen2_vl' in b.MLLM_ADAPTERS; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


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
