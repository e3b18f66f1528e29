"""The LLaVA adapter against a plain full forward of the real transformers classes (tiny, CPU, float32)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lens_cache.backbones import build_extractor, build_mllm
from lens_cache.backbones.llava import VICUNA_V1_TEMPLATE, LlavaBackbone
from lens_cache.backbones.mllm import MllmCheckpointNotFoundError, UnsupportedMllmError
from lens_cache.backbones.tiny_llava import build_tiny_llava, save_tiny_llava
from tests.helpers.images import padded_squares, random_image

ATOL = 1e-5

QUESTIONS_A = [
    "Can you segment the red circle in this image?",
    "What object in this picture would someone use to carry water on a long walk?",
    "Can you segment the small blue square on the left in this image?",
]
QUESTIONS_B = ["Can you segment the green triangle in this image?"]


@pytest.fixture(scope="module")
def backbone() -> LlavaBackbone:
    return LlavaBackbone.tiny(layers=(14, 30), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def squares() -> list[Image.Image]:
    """Two non-square images brought into SAM's padded square, as the extractor feeds LLaVA."""
    return padded_squares()


@pytest.fixture(scope="module")
def encoded(backbone: LlavaBackbone, squares):
    return backbone.encode(squares, [QUESTIONS_A, QUESTIONS_B])


def _reference(backbone: LlavaBackbone, image: Image.Image, question: str):
    """Plain full forward of the whole prompt through the processor: (input_ids (S,), hidden_states)."""
    inputs = backbone.processor(text=backbone.prompt_for(question), images=image, return_tensors="pt")
    with torch.inference_mode():
        out = backbone.model(**inputs, output_hidden_states=True)
    return inputs["input_ids"][0], out.hidden_states


def test_shared_prefix_states_equal_full_forward(backbone, squares, encoded):
    """THE key test: prefix once per image (two images batched), suffixes right-padded, == hidden_states[k]."""
    lengths = {backbone.num_text_tokens(q) for q in QUESTIONS_A}
    assert len(lengths) == len(QUESTIONS_A), "questions of different lengths exercise the right padding"
    for image, questions, states in zip(squares, [QUESTIONS_A, QUESTIONS_B], encoded):
        assert len(states.text_states) == len(questions)
        for question, text_states in zip(questions, states.text_states):
            input_ids, hidden = _reference(backbone, image, question)
            image_pos = (input_ids == backbone.model.config.image_token_id).nonzero()[:, 0]
            assert len(image_pos) == 576
            text_pos = torch.arange(int(image_pos[-1]) + 1, len(input_ids))
            assert text_states[14].shape[0] == len(text_pos) == backbone.num_text_tokens(question)
            for k in (14, 30):
                torch.testing.assert_close(states.image_states[k], hidden[k][0, image_pos], atol=ATOL, rtol=0)
                torch.testing.assert_close(text_states[k], hidden[k][0, text_pos], atol=ATOL, rtol=0)


def test_prefix_runs_once_per_batch(backbone, squares):
    """The vision tower and the image prefix run once for all questions of all images."""
    calls: list[tuple[int, int]] = []
    vision_calls: list[int] = []
    layer0 = backbone.model.model.language_model.layers[0]
    h1 = layer0.register_forward_hook(lambda m, a, o: calls.append(tuple(o.shape[:2])))
    h2 = backbone.model.model.vision_tower.register_forward_hook(lambda m, a, o: vision_calls.append(1))
    try:
        backbone.encode(squares, [QUESTIONS_A, QUESTIONS_B])
    finally:
        h1.remove()
        h2.remove()
    assert len(vision_calls) == 1
    prefix_len = len(backbone._prefix_ids)
    assert calls[0] == (2, prefix_len)  # both prefixes in one forward
    assert len(calls) == 2 and calls[1][0] == 4  # then the 4 suffixes in one forward
    assert calls[1][1] == max(backbone.num_text_tokens(q) for q in QUESTIONS_A + QUESTIONS_B)


def test_chunked_suffixes_and_single_image_match(backbone, squares, encoded):
    chunked = LlavaBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=(14, 30), max_query_batch=1)
    alone = chunked.encode(squares[1:], [QUESTIONS_B])[0]
    for k in (14, 30):
        torch.testing.assert_close(alone.image_states[k], encoded[1].image_states[k], atol=ATOL, rtol=0)
        torch.testing.assert_close(alone.text_states[0][k], encoded[1].text_states[0][k], atol=ATOL, rtol=0)
    # An image without questions still gets its image states.
    empty = backbone.encode(squares[:1], [[]])[0]
    assert empty.text_states == []
    torch.testing.assert_close(empty.image_states[14], encoded[0].image_states[14], atol=ATOL, rtol=0)


def test_truncated_forward_never_applies_final_norm(backbone, squares):
    """Layer 32 = the last one: the cached state is its raw output, not the normed hidden_states[-1]."""
    last = LlavaBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=(32,))
    states = last.encode(squares[:1], [QUESTIONS_B])[0]
    lm = backbone.model.model.language_model
    raw: list[torch.Tensor] = []
    handle = lm.layers[31].register_forward_hook(lambda m, a, o: raw.append(o))
    try:
        input_ids, hidden = _reference(backbone, squares[0], QUESTIONS_B[0])
    finally:
        handle.remove()
    image_pos = (input_ids == backbone.model.config.image_token_id).nonzero()[:, 0]
    torch.testing.assert_close(states.image_states[32], raw[0][0, image_pos], atol=ATOL, rtol=0)
    # hidden_states[32] is the normed one: the cache must differ from it, and norm(cache) must equal it.
    assert not torch.allclose(states.image_states[32], hidden[32][0, image_pos], atol=1e-3)
    with torch.inference_mode():
        torch.testing.assert_close(lm.norm(states.image_states[32]), hidden[32][0, image_pos], atol=ATOL, rtol=0)


def test_forward_stops_after_deepest_layer_and_leaves_model_untouched(backbone, squares):
    lm = backbone.model.model.language_model
    before = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    # transformers installs its own (permanent) output-capturing hooks; ours must all be gone.
    hooks_before = [len(layer._forward_hooks) for layer in lm.layers]
    deeper: list[int] = []
    handles = [lm.layers[14].register_forward_hook(lambda m, a, o: deeper.append(1)),
               lm.norm.register_forward_hook(lambda m, a, o: deeper.append(2))]
    shallow = LlavaBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=(14,))
    try:
        out = shallow.encode(squares, [QUESTIONS_A, QUESTIONS_B])
    finally:
        for h in handles:
            h.remove()
    assert deeper == []  # neither decoder layer index 14 (the 15th) nor the final norm ran
    assert set(out[0].image_states) == {14}
    # Unchanged model: same weights, no grads, no hooks left behind, layers and norm in place.
    for name, p in backbone.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None and not p.requires_grad
    assert len(lm.layers) == 32 and type(lm.norm).__name__ == "LlamaRMSNorm"
    assert [len(layer._forward_hooks) for layer in lm.layers] == hooks_before
    # Results are ordinary tensors (not inference tensors): stage 2 can feed them to a trainable head.
    assert not out[0].image_states[14].is_inference()
    assert out[0].image_states[14].dtype == torch.float32 and out[0].image_states[14].device.type == "cpu"


def test_image_and_text_tokens(backbone):
    prefix, suffix = backbone._split_ids(QUESTIONS_A[0])
    image_token = backbone.model.config.image_token_id
    assert backbone.num_image_tokens == 576
    assert sum(t == image_token for t in prefix) == 576 and prefix[-1] == image_token
    assert image_token not in suffix
    # F_t = "\n{question} ASSISTANT:": its last token is the start-of-answer ':'.
    tokens = backbone.processor.tokenizer.convert_ids_to_tokens(suffix)
    assert tokens[-2:] == ["assistant", ":"]
    assert backbone.num_text_tokens(QUESTIONS_A[0]) == len(suffix)
    # Same ids as the processor's own expansion of the full prompt.
    full = backbone.processor(text=backbone.prompt_for(QUESTIONS_A[0]), images=Image.new("RGB", (8, 8)))["input_ids"][0]
    assert list(full) == prefix + suffix
    with pytest.raises(ValueError, match="image token"):
        backbone.num_text_tokens("What is <image> here?")


def test_question_rule_and_identity(backbone):
    assert backbone.question_for("red circle", is_sentence=False) == "Can you segment the red circle in this image?"
    assert backbone.question_for("What holds water?", is_sentence=True) == "What holds water?"
    ident = backbone.identity
    json.dumps(ident)  # serialisable
    assert ident["backbone"] == "llava-1.5" and ident["layers"] == [14, 30]
    assert ident["prompt_template"] == VICUNA_V1_TEMPLATE
    other_layers = LlavaBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=(14,))
    other_prompt = LlavaBackbone(
        backbone.model, backbone.processor, name_or_path="tiny", layers=(14, 30),
        prompt_template=VICUNA_V1_TEMPLATE.replace("polite", "short"),
    )
    other_question = LlavaBackbone(
        backbone.model, backbone.processor, name_or_path="tiny", layers=(14, 30),
        question_template="Please segment the {text}.",
    )
    assert other_layers.identity != ident and other_prompt.identity != ident and other_question.identity != ident
    assert other_layers.identity["config_hash"] == ident["config_hash"]
    with pytest.raises(ValueError, match="layers"):
        LlavaBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=(33,))
    with pytest.raises(ValueError, match="layers"):
        LlavaBackbone(backbone.model, backbone.processor, name_or_path="tiny", layers=(0,))


def test_tiny_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_tiny_llava()
    b, _ = build_tiny_llava()
    assert torch.equal(torch.rand(3), expected)  # the global RNG state is untouched
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_saved_tiny_loads_through_real_loader(tmp_path, backbone, squares, encoded):
    folder = save_tiny_llava(tmp_path / "tiny-llava")
    loaded = build_mllm(str(folder), layers=(14, 30), device="cpu")
    assert isinstance(loaded, LlavaBackbone) and loaded.model.dtype == torch.float32
    assert loaded.identity["config_hash"] == backbone.identity["config_hash"]
    assert loaded.identity["weights_fingerprint"] == backbone.identity["weights_fingerprint"]
    assert loaded.identity["name_or_path"] == str(folder)
    again = loaded.encode(squares, [QUESTIONS_A, QUESTIONS_B])
    for a, b in zip(again, encoded):
        for k in (14, 30):
            torch.testing.assert_close(a.image_states[k], b.image_states[k], atol=0, rtol=0)
            for ta, tb in zip(a.text_states, b.text_states):
                torch.testing.assert_close(ta[k], tb[k], atol=0, rtol=0)


def test_missing_or_wrong_mllm_checkpoint(tmp_path):
    expected = f"MLLM checkpoint not found at {tmp_path / 'nope'}: pass --mllm PATH to a local llava-hf folder or 'tiny'"
    with pytest.raises(MllmCheckpointNotFoundError) as err:
        build_mllm(str(tmp_path / "nope"))
    assert str(err.value) == expected
    with pytest.raises(MllmCheckpointNotFoundError, match="not found at llava-hf/not-in-the-cache"):
        build_mllm("llava-hf/not-in-the-cache")
    with pytest.raises(MllmCheckpointNotFoundError):  # a folder without config.json
        build_mllm(str(tmp_path))
    # A real checkpoint of another family: no adapter registered for it.
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedMllmError, match="'llama'"):
        build_mllm(str(tmp_path / "llama"))
    with pytest.raises(UnsupportedMllmError, match="not a LLaVA checkpoint"):
        LlavaBackbone.from_pretrained(str(tmp_path / "llama"))


def test_generate_and_decoder_layer_weights(backbone):
    image = random_image(2, 200, 100)
    answer = backbone.generate(image, "What is in this image?", max_new_tokens=4, min_new_tokens=2)
    assert isinstance(answer, str) and answer
    assert answer == backbone.generate(image, "What is in this image?", max_new_tokens=4, min_new_tokens=2)
    assert isinstance(backbone.generate(None, "Is this a question?", max_new_tokens=2, min_new_tokens=1), str)

    weights = backbone.decoder_layer_state_dict(14)
    layer = backbone.model.model.language_model.layers[14]
    assert set(weights) == set(layer.state_dict())
    assert "self_attn.q_proj.weight" in weights and "mlp.gate_proj.weight" in weights
    assert "input_layernorm.weight" in weights and "post_attention_layernorm.weight" in weights
    torch.testing.assert_close(weights["self_attn.q_proj.weight"], layer.self_attn.q_proj.weight, atol=0, rtol=0)
    weights["self_attn.q_proj.weight"].zero_()  # a copy: the model is not touched
    assert layer.self_attn.q_proj.weight.abs().sum() > 0
    with pytest.raises(IndexError):
        backbone.decoder_layer_state_dict(32)


def test_extractor_uses_sam_frame_for_both_backbones(backbone, squares, encoded):
    """build_extractor end to end: the MLLM sees SAM's padded square, SAM gives 256x64x64."""
    extractor = build_extractor(mllm="tiny", sam="tiny", layers=(14, 30), device="cpu")
    images = [random_image(0, 300, 500), random_image(1, 640, 480)]
    features = extractor.extract(images, [QUESTIONS_A, QUESTIONS_B])
    assert [f.original_size for f in features] == [(300, 500), (640, 480)]
    assert [f.input_size for f in features] == [(614, 1024), (1024, 768)]
    for f, ref in zip(features, encoded):
        assert f.sam_embedding.shape == (256, 64, 64)
        torch.testing.assert_close(f.image_states[30], ref.image_states[30], atol=ATOL, rtol=0)
        torch.testing.assert_close(f.text_states[-1][14], ref.text_states[-1][14], atol=ATOL, rtol=0)
    assert extractor.identity["image_geometry"] == "sam-pad-1024-to-336"
    assert extractor.identity["sam"]["weights"] == "tiny-seed0"
    assert extractor.identity["dtype"] == "float16"
    assert (extractor.layers, extractor.hidden_size, extractor.num_image_tokens) == ((14, 30), 64, 576)
    single = extractor.extract_one(images[1], QUESTIONS_B[0])
    torch.testing.assert_close(single.text_states[0][14], features[1].text_states[0][14], atol=ATOL, rtol=0)


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


def test_head_sizes_name_grouped_query_attention_only_when_there(backbone):
    """LLaVA-1.5 (multi-head) records the head sizes as before; a GQA text model adds num_key_value_heads."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    assert set(backbone.head_sizes) == {"hidden_size", "num_heads", "mlp_size", "rms_norm_eps", "rope_theta"}
    gqa = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    assert LlavaBackbone.head_sizes.fget(SimpleNamespace(text_config=gqa))["num_key_value_heads"] == 2
