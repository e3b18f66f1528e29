"""The contract every prefix-sharing MLLM adapter keeps (LLaVA-1.5, Qwen2-VL, LLaVA-OneVision), one test per
clause, parametrized over the three adapters: tiny random models of the real transformers classes, CPU, float32.

Each adapter's cached states equal ``hidden_states[k]`` of a plain full forward; its image prefix runs once per
batch; the forward stops after the deepest cached layer (never the final norm) and leaves the model as it was;
its prompt ids are the processor's; its identity names what it computes (field by field, in order); its warm-start
layers load strictly into a head of its layer type and compute its layer k; a saved checkpoint loads through
the shared loader (:meth:`~lens_cache.backbones.prefix_sharing.PrefixSharingBackbone.from_pretrained`) to the
same states, and another family's checkpoint is refused in one line.

What only one family has (Qwen2-VL's M-RoPE, OneVision's AnyRes tile, the presets, the end-to-end stores) is in
``test_backbones_llava.py``, ``test_backbones_qwen2vl.py`` and ``test_backbones_onevision.py``. Each adapter's
backbone, states and extractor are built once (module-scoped fixtures, grouped by adapter).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from lens_cache.backbones import BUILTIN_MLLMS, MLLM_ADAPTERS, build_extractor, build_mllm
from lens_cache.backbones.llava import VICUNA_V1_TEMPLATE, LlavaBackbone
from lens_cache.backbones.mllm import MllmCheckpointNotFoundError, UnsupportedMllmError
from lens_cache.backbones.onevision import ONEVISION_TEMPLATE, OnevisionBackbone
from lens_cache.backbones.qwen2vl import QWEN2_VL_TEMPLATE, Qwen2VLBackbone
from lens_cache.backbones.tiny_llava import save_tiny_llava
from lens_cache.backbones.tiny_onevision import save_tiny_onevision
from lens_cache.backbones.tiny_qwen2vl import save_tiny_qwen2vl
from lens_core import LensConfig
from lens_core.head import SegmentationHead
from lens_train.training.presets import load_preset
from tests.helpers.backbones import ATOL, check_against_full_forward, full_forward
from tests.helpers.images import padded_squares, random_image

#: the fields every identity has, in order (stores compare identities as JSON: order and names are pinned)
_HEAD = ("backbone", "name_or_path", "config_hash", "weights_fingerprint", "layers", "hidden_size", "num_image_tokens")
_TAIL = ("compute_dtype", "prompt_template", "question_template")


@dataclass(frozen=True)
class Adapter:
    """One adapter as the contract sees it: how to build its tiny model and what it must give."""

    mllm: str  # the built-in ``--mllm`` name of its tiny model (also its identity's name_or_path)
    cls: type
    layers: tuple[int, int]  # two cached layers: (k, a later one)
    questions: tuple[list[str], list[str]]  # per image; the first image's of different token lengths
    backbone_name: str
    template: str  # its default prompt (the saved tiny checkpoints' chat template renders it too)
    run_length: int  # image tokens in the prompt
    cached: int  # of which the first ``cached`` are cached
    grid: int
    geometry: str  # the image geometry of the built-in (default) way
    layer_type: str  # of its decoder layers, as a LENS head names it
    norm: str  # class name of the final norm (never applied to a cached state)
    model_types: tuple[str, ...]
    family: str  # as the loader's refusal names it
    vision: str  # the vision tower, an attribute of ``model.model``
    save: Callable[[Path], Path]  # writes the tiny model as a checkpoint folder
    positions: Callable[[int], torch.Tensor]  # 1-D positions 0..L-1 as its rotary embedding takes them
    refused: tuple[tuple[str, str], ...]  # questions holding a special token, and the message
    answer_start: list[str]  # the suffix's last tokens: the template's start of the answer (the last is read)
    identity: tuple[str, ...]  # the identity's fields, in order
    identity_values: dict = field(default_factory=dict)  # the image geometry's fields
    tiny_kwargs: dict = field(default_factory=dict)  # the way tested against the processor's forward
    loaded_config: dict = field(default_factory=dict)  # what the loader sets on a saved checkpoint's config

    def __str__(self) -> str:
        return self.mllm


ADAPTERS = [
    Adapter(
        mllm="tiny", cls=LlavaBackbone, layers=(14, 30),
        questions=(["Can you segment the red circle in this image?",
                    "What object in this picture would someone use to carry water on a long walk?",
                    "Can you segment the small blue square on the left in this image?"],
                   ["Can you segment the green triangle in this image?"]),
        backbone_name="llava-1.5", template=VICUNA_V1_TEMPLATE, run_length=576, cached=576, grid=24,
        geometry="sam-pad-1024-to-336", layer_type="llama", norm="LlamaRMSNorm", model_types=("llava",),
        family="LLaVA", vision="vision_tower", save=save_tiny_llava,
        positions=lambda length: torch.arange(length)[None],
        refused=(("What is <image> here?", "image token"),), answer_start=["assistant", ":"], identity=_HEAD + _TAIL,
    ),
    Adapter(
        mllm="tiny-qwen2vl", cls=Qwen2VLBackbone, layers=(20, 27),  # Qwen2-VL-2B's main and late layers (of 28)
        questions=(["Can you segment the red circle in this image?",
                    "What object in this picture would someone use to carry water on a long walk?"],
                   ["Can you segment the green triangle in this image?"]),
        backbone_name="qwen2-vl", template=QWEN2_VL_TEMPLATE, run_length=576, cached=576, grid=24,
        geometry="sam-pad-1024-to-672", layer_type="qwen2", norm="Qwen2VLRMSNorm", model_types=("qwen2_vl", "qwen2_5_vl"),
        family="Qwen2-VL / Qwen2.5-VL", vision="visual", save=save_tiny_qwen2vl,
        positions=lambda length: torch.arange(length)[None, None].expand(3, 1, length),  # M-RoPE ids, all three equal
        refused=(("What is <|image_pad|> here?", "special token"), ("What is <|im_end|> here?", "special token")),
        answer_start=["<|im_end|>", "<|im_start|>", "assistant"],
        identity=_HEAD + ("image_size",) + _TAIL, identity_values={"image_size": 672},
    ),
    Adapter(
        mllm="tiny-onevision", cls=OnevisionBackbone, layers=(20, 27),
        questions=(["Can you segment the red circle in this image?",
                    "What object in this picture would someone use to carry water on a long walk?"],
                   ["Which shape is left of the blue square?"]),
        backbone_name="llava-onevision", template=ONEVISION_TEMPLATE, run_length=729 + 27 * 28, cached=729, grid=27,
        geometry="sam-pad-1024-to-384", layer_type="qwen2", norm="Qwen2RMSNorm", model_types=("llava_onevision",),
        family="LLaVA-OneVision", vision="vision_tower", save=save_tiny_onevision,
        positions=lambda length: torch.arange(length)[None],
        refused=(("What is <image> here?", "special token"), ("What is <|im_end|> here?", "special token")),
        answer_start=["<|im_end|>", "<|im_start|>", "assistant"],
        # the processor's AnyRes way (its identity as before image_tokens existed); the built-in and the loader's
        # default, the authors' base way, is held to its own full forward in test_cache_fidelity_backbones.py
        tiny_kwargs={"image_tokens": "anyres"},
        identity=_HEAD + ("image_size", "grid_size", "image_grid_pinpoints") + _TAIL,
        identity_values={"image_size": 384, "grid_size": 27, "image_grid_pinpoints": [[384, 384]]},
        loaded_config={"image_grid_pinpoints": [[384, 384]]},  # the saved 36 pinpoints are restricted
    ),
]


@pytest.fixture(scope="module", params=ADAPTERS, ids=str)
def adapter(request) -> Adapter:
    return request.param


@pytest.fixture(scope="module")
def extractor(adapter):
    """``build_extractor`` of the built-in tiny model (its default way) with the tiny SAM."""
    return build_extractor(mllm=adapter.mllm, sam="tiny", layers=adapter.layers, device="cpu")


@pytest.fixture(scope="module")
def backbone(adapter, extractor):
    """The built-in tiny model (as ``Adapter.cls.tiny`` builds it; OneVision's in the fixture's own way)."""
    if not adapter.tiny_kwargs:
        return extractor.mllm
    return adapter.cls.tiny(layers=adapter.layers, device="cpu", dtype=torch.float32, **adapter.tiny_kwargs)


@pytest.fixture(scope="module")
def squares() -> list[Image.Image]:
    """Two non-square images brought into SAM's padded square, as the extractor feeds the MLLM."""
    return padded_squares()


@pytest.fixture(scope="module")
def encoded_and_calls(backbone, adapter, squares):
    """``backbone.encode(squares, questions)``, and what ran: the shapes (batch, length) of the first decoder
    layer's outputs and the number of vision-tower calls (for :func:`test_prefix_runs_once_per_batch`)."""
    calls: list[tuple[int, int]] = []
    vision_calls: list[int] = []
    layer0 = backbone.model.model.language_model.layers[0]
    h1 = layer0.register_forward_hook(lambda m, a, o: calls.append(tuple(o.shape[:2])))
    h2 = getattr(backbone.model.model, adapter.vision).register_forward_hook(lambda m, a, o: vision_calls.append(1))
    try:
        encoded = backbone.encode(squares, list(adapter.questions))
    finally:
        h1.remove()
        h2.remove()
    return encoded, calls, len(vision_calls)


@pytest.fixture(scope="module")
def encoded(encoded_and_calls):
    return encoded_and_calls[0]


@pytest.fixture(scope="module")
def references(adapter, backbone, squares):
    """``(image index, question) -> (input_ids, image-run positions, hidden_states, raw output of the last
    decoder layer)``: a plain full forward of every prompt of :func:`encoded`, computed once."""
    found = {}
    raw: list[torch.Tensor] = []
    handle = backbone.model.model.language_model.layers[-1].register_forward_hook(lambda m, a, o: raw.append(o))
    try:
        for i, (square, questions) in enumerate(zip(squares, adapter.questions)):
            for question in questions:
                found[i, question] = (*full_forward(backbone, square, question), raw.pop())
    finally:
        handle.remove()
    return found


@pytest.fixture(scope="module")
def default_way(adapter, backbone, extractor):
    """The adapter as the registry and the loader build it (OneVision: the base way, not the fixture's)."""
    return extractor.mllm


@pytest.fixture(scope="module")
def default_encoded(adapter, default_way, backbone, encoded, squares):
    return encoded if default_way is backbone else default_way.encode(squares, list(adapter.questions))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A real checkpoint of a family no adapter loads (a one-layer LLaMA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("checkpoints") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(folder)
    return folder


def _other(adapter: Adapter, backbone, **kwargs):
    """Another adapter of the same model and processor (fixture's way, tiny name)."""
    options = {"name_or_path": adapter.mllm, "layers": adapter.layers, **adapter.tiny_kwargs, **kwargs}
    return adapter.cls(backbone.model, backbone.processor, **options)


# ---------------------------------------------------------------------------------------------- the states


def test_shared_prefix_states_equal_full_forward(adapter, backbone, squares, encoded, references):
    """THE key test: the prefix once per image (two images batched, KV cache), each question's suffix alone,
    positions continued, right-padded == hidden_states[k] of a plain full forward, for the cached image tokens
    and every token after the image."""
    first = adapter.questions[0]
    assert len({backbone.num_text_tokens(q) for q in first}) == len(first), "lengths differ: padding exercised"
    check_against_full_forward(backbone, squares, adapter.questions, encoded, adapter.layers,
                               run_length=adapter.run_length, references=references)


def test_prefix_runs_once_per_batch(adapter, backbone, encoded_and_calls):
    """The vision tower and the image prefix run once for all questions of all images."""
    _, calls, vision_calls = encoded_and_calls
    questions = [q for qs in adapter.questions for q in qs]
    assert vision_calls == 1
    assert calls[0] == (2, len(backbone._prefix_ids))  # both prefixes in one forward
    assert len(calls) == 2 and calls[1][0] == len(questions)  # then every suffix in one forward
    assert calls[1][1] == max(backbone.num_text_tokens(q) for q in questions)


def test_chunked_suffixes_and_single_image_match(adapter, backbone, squares, encoded):
    chunked = _other(adapter, backbone, max_query_batch=1)
    alone = chunked.encode(squares[1:], [adapter.questions[1]])[0]
    for k in adapter.layers:
        torch.testing.assert_close(alone.image_states[k], encoded[1].image_states[k], atol=ATOL, rtol=0)
        torch.testing.assert_close(alone.text_states[0][k], encoded[1].text_states[0][k], atol=ATOL, rtol=0)
    # An image without questions still gets its image states.
    empty = backbone.encode(squares[:1], [[]])[0]
    assert empty.text_states == []
    k = adapter.layers[0]
    torch.testing.assert_close(empty.image_states[k], encoded[0].image_states[k], atol=ATOL, rtol=0)


def test_truncated_forward_never_applies_final_norm(adapter, backbone, squares, references):
    """The last layer: the cached state is its raw output, not the normed hidden_states[-1]."""
    last_layer = backbone.num_hidden_layers
    question = adapter.questions[0][0]
    states = _other(adapter, backbone, layers=(last_layer,)).encode(squares[:1], [[question]])[0]
    _, run, hidden, raw = references[0, question]
    cached = run[: backbone.num_image_tokens]
    torch.testing.assert_close(states.image_states[last_layer], raw[0, cached], atol=ATOL, rtol=0)
    # hidden_states[-1] is the normed one: the cache must differ from it, and norm(cache) must equal it.
    assert not torch.allclose(states.image_states[last_layer], hidden[last_layer][0, cached], atol=1e-3)
    with torch.inference_mode():
        lm = backbone.model.model.language_model
        torch.testing.assert_close(lm.norm(states.image_states[last_layer]), hidden[last_layer][0, cached],
                                   atol=ATOL, rtol=0)


def test_generate_then_encode_stops_early_and_leaves_the_model_untouched(adapter, backbone, squares, references):
    """Dialogue works (greedy: the same answer twice); an encode after it (Qwen2-VL's generate sets rope_deltas)
    still equals the full forward, stops after the deepest cached layer (neither the next decoder layer nor the
    final norm runs) and leaves the model as it was: weights, no gradients, no hook, layers and norm in place."""
    lm = backbone.model.model.language_model
    before = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    # transformers installs its own (permanent) output-capturing hooks; ours must all be gone.
    hooks_before = [len(layer._forward_hooks) for layer in lm.layers]
    image = random_image(2, 200, 100)
    answer = backbone.generate(image, "What is in this image?", max_new_tokens=4, min_new_tokens=2)
    assert isinstance(answer, str) and answer
    assert answer == backbone.generate(image, "What is in this image?", max_new_tokens=4, min_new_tokens=2)
    assert isinstance(backbone.generate(None, "Is this a question?", max_new_tokens=2, min_new_tokens=1), str)

    k = adapter.layers[0]
    deeper: list[int] = []
    handles = [lm.layers[k].register_forward_hook(lambda m, a, o: deeper.append(1)),
               lm.norm.register_forward_hook(lambda m, a, o: deeper.append(2))]
    shallow = _other(adapter, backbone, layers=(k,))
    question = adapter.questions[0][0]
    try:
        out = shallow.encode(squares[:1], [[question]])[0]
    finally:
        for h in handles:
            h.remove()
    assert deeper == []  # neither decoder layer index k (the (k+1)-th) nor the final norm ran
    assert set(out.image_states) == {k}
    _, run, hidden, _ = references[0, question]  # a full forward before the generate calls
    torch.testing.assert_close(out.text_states[0][k], hidden[k][0, int(run[-1]) + 1:], atol=ATOL, rtol=0)
    for name, p in backbone.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None and not p.requires_grad
    assert len(lm.layers) == backbone.num_hidden_layers and type(lm.norm).__name__ == adapter.norm
    assert [len(layer._forward_hooks) for layer in lm.layers] == hooks_before
    # Results are ordinary tensors (not inference tensors): stage 2 can feed them to a trainable head.
    assert not out.image_states[k].is_inference()
    assert out.image_states[k].dtype == torch.float32 and out.image_states[k].device.type == "cpu"


# ---------------------------------------------------------------------------------------- prompt, identity


def test_image_and_text_tokens(adapter, backbone):
    """The prompt is the template; its ids are the processor's own, split after the image-token run."""
    question = adapter.questions[0][0]
    assert backbone.prompt_for("Q?") == adapter.template.replace("{question}", "Q?")
    prefix, suffix = backbone._split_ids(question)
    image_token = backbone.model.config.image_token_id
    assert backbone.num_image_tokens == adapter.cached and backbone.grid_size == adapter.grid
    assert sum(t == image_token for t in prefix) == adapter.run_length and prefix[-1] == image_token
    assert prefix[-adapter.run_length:] == [image_token] * adapter.run_length  # one run, at the end of the prefix
    assert image_token not in suffix
    tokens = backbone.processor.tokenizer.convert_ids_to_tokens(suffix)
    assert tokens[-len(adapter.answer_start):] == adapter.answer_start  # the text states' last row: start of answer
    assert backbone.num_text_tokens(question) == len(suffix)
    frame = backbone.model_image(Image.new("RGB", (1024, 1024)))
    full = backbone.processor(text=backbone.prompt_for(question), images=frame)["input_ids"][0]
    assert list(full) == prefix + suffix
    for text, message in adapter.refused:
        with pytest.raises(ValueError, match=message):
            backbone.num_text_tokens(text)


def test_question_rule_and_identity(adapter, backbone):
    assert backbone.question_for("red circle", is_sentence=False) == "Can you segment the red circle in this image?"
    assert backbone.question_for("What holds water?", is_sentence=True) == "What holds water?"
    ident = backbone.identity
    json.dumps(ident)  # serialisable
    assert tuple(ident) == adapter.identity
    assert ident["backbone"] == adapter.backbone_name and ident["name_or_path"] == adapter.mllm
    assert ident["layers"] == list(adapter.layers) and ident["hidden_size"] == 64
    assert ident["num_image_tokens"] == adapter.cached and ident["compute_dtype"] == "float32"
    assert ident["prompt_template"] == adapter.template
    assert {key: ident[key] for key in adapter.identity_values} == adapter.identity_values
    other_layers = _other(adapter, backbone, layers=adapter.layers[:1])
    other_prompt = _other(adapter, backbone, prompt_template=adapter.template.replace("{question}", "Briefly: {question}"))
    other_question = _other(adapter, backbone, question_template="Please segment the {text}.")
    assert other_layers.identity != ident and other_prompt.identity != ident and other_question.identity != ident
    assert other_layers.identity["config_hash"] == ident["config_hash"]
    for layers in ((backbone.num_hidden_layers + 1,), (0,)):
        with pytest.raises(ValueError, match="layers"):
            _other(adapter, backbone, layers=layers)


def test_registered_by_name_and_by_model_type(adapter):
    assert adapter.mllm in BUILTIN_MLLMS and set(adapter.model_types) <= set(MLLM_ADAPTERS)
    assert adapter.cls.MODEL_TYPES == adapter.model_types and adapter.cls.FAMILY == adapter.family


def test_registry_import_stays_light():
    """The registry imports every adapter module (entry points), none of which may import transformers (stage 2
    imports lens_cache.backbones.sam without it). One interpreter for the three adapters."""
    builtins = {adapter.mllm for adapter in ADAPTERS}
    model_types = {model_type for adapter in ADAPTERS for model_type in adapter.model_types}
    code = ("import sys, lens_cache.backbones as b; "
            f"assert {builtins!r} <= set(b.BUILTIN_MLLMS) and {model_types!r} <= set(b.MLLM_ADAPTERS); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ warm start, extractor


def test_warm_start_layers_load_strictly_into_a_head_of_its_layer_type(adapter, backbone, encoded, extractor):
    """Layers k, k+1 (on the CPU, transformers' names) load strictly into a head configured with the adapter's
    head_sizes, not into one of the other layer type; its first layer computes the backbone's layer k (not k + 1)
    on the cached layer-k states with 1-D positions 0..L-1."""
    k = adapter.layers[0]
    lm = backbone.model.model.language_model
    weights = backbone.decoder_layer_state_dict(k)
    layer = lm.layers[k]
    assert set(weights) == set(layer.state_dict())
    assert {"self_attn.q_proj.weight", "mlp.gate_proj.weight", "input_layernorm.weight",
            "post_attention_layernorm.weight"} <= set(weights)
    torch.testing.assert_close(weights["self_attn.q_proj.weight"], layer.self_attn.q_proj.weight, atol=0, rtol=0)
    # the model's own tensors on a CPU model (no copy of a 7B MLLM's two layers: tests/test_cache_memory.py)
    assert weights["self_attn.q_proj.weight"].data_ptr() == layer.self_attn.q_proj.weight.data_ptr()
    with pytest.raises(IndexError):
        backbone.decoder_layer_state_dict(backbone.num_hidden_layers)

    sizes, state_dicts = extractor.decoder_layers([k, k + 1])
    assert sizes == backbone.head_sizes and sizes.get("layer_type", "llama") == adapter.layer_type
    if adapter.layer_type == "qwen2":  # q/k/v biases, grouped-query attention, Qwen2's RoPE theta
        assert sizes["num_key_value_heads"] == 2 and sizes["rope_theta"] == 1e6
        assert "self_attn.q_proj.bias" in state_dicts[0] and "self_attn.o_proj.bias" not in state_dicts[0]
    else:  # LLaVA-1.5 (multi-head) records the head sizes as before: no layer type, no key/value heads
        assert set(sizes) == {"hidden_size", "num_heads", "mlp_size", "rms_norm_eps", "rope_theta"}
        assert "self_attn.q_proj.bias" not in state_dicts[0]
    tiny = load_preset("tiny").model.to_dict()
    cfg = LensConfig.from_dict({**tiny, **sizes, "grid_size": adapter.grid})
    head = SegmentationHead(config=cfg).eval()
    head.load_decoder_layers(state_dicts)  # strict
    other_type = "llama" if adapter.layer_type == "qwen2" else "qwen2"
    with pytest.raises(RuntimeError):
        SegmentationHead(config=LensConfig.from_dict({**tiny, **sizes, "layer_type": other_type})
                         ).load_decoder_layers(state_dicts)

    states = encoded[0]
    x = torch.cat([states.image_states[k], states.text_states[0][k]])[None]
    length = x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    rotary = lm.rotary_emb(x, adapter.positions(length))
    with torch.no_grad():
        expected = lm.layers[k](x, attention_mask=mask, position_embeddings=rotary)
        ours, _ = head.layers[0](x, *head.rotary(torch.arange(length)))
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-5)
        other = lm.layers[k + 1](x, attention_mask=mask, position_embeddings=rotary)
        assert (ours - other).abs().max() > 10 * ATOL  # the layer matters: k, not k + 1
        out = head(states.image_states[k][None], states.text_states[0][k][None],
                   torch.tensor([states.text_states[0][k].shape[0]]))
    assert out.heatmap.shape == (1, adapter.grid, adapter.grid) and torch.isfinite(out.heatmap).all()


def test_extractor_uses_sam_frame_for_both_backbones(adapter, extractor, default_encoded):
    """build_extractor end to end (the built-in tiny model, the tiny SAM): the MLLM sees SAM's padded square."""
    images = [random_image(0, 300, 500), random_image(1, 640, 480)]  # padded_squares' images
    features = extractor.extract(images, list(adapter.questions))
    assert [f.original_size for f in features] == [(300, 500), (640, 480)]
    assert [f.input_size for f in features] == [(614, 1024), (1024, 768)]
    low, high = adapter.layers
    for f, ref in zip(features, default_encoded):
        assert f.sam_embedding.shape == (256, 64, 64)
        torch.testing.assert_close(f.image_states[high], ref.image_states[high], atol=ATOL, rtol=0)
        torch.testing.assert_close(f.text_states[-1][low], ref.text_states[-1][low], atol=ATOL, rtol=0)
    assert extractor.identity["image_geometry"] == adapter.geometry
    assert extractor.identity["sam"]["weights"] == "tiny-seed0"
    assert extractor.identity["dtype"] == "float16"
    assert (extractor.layers, extractor.hidden_size, extractor.num_image_tokens) == (
        adapter.layers, 64, extractor.mllm.num_image_tokens)
    single = extractor.extract_one(images[1], adapter.questions[1][0])
    torch.testing.assert_close(single.text_states[0][low], features[1].text_states[0][low], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ loading


def test_saved_tiny_loads_through_the_shared_loader(adapter, backbone, default_way, default_encoded, squares,
                                                    tmp_path, llama_folder):
    """A saved checkpoint loads (build_mllm -> the adapter's from_pretrained, offline) frozen, in float32 on the
    CPU, with the identity of the built-in model but its folder, the template of its saved chat template, and
    the same states bit for bit; another family's checkpoint is refused in one line naming its model type."""
    folder = adapter.save(tmp_path / adapter.mllm)
    loaded = build_mllm(str(folder), layers=adapter.layers, device="cpu", question_set="single")  # as the tiny one
    assert isinstance(loaded, adapter.cls) and loaded.model.dtype == torch.float32
    assert loaded.device.type == "cpu" and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.identity == {**default_way.identity, "name_or_path": str(folder)}
    assert loaded.identity["config_hash"] == backbone.identity["config_hash"]
    assert loaded.identity["weights_fingerprint"] == backbone.identity["weights_fingerprint"]
    assert loaded.prompt_template == adapter.template
    assert {key: getattr(loaded.model.config, key) for key in adapter.loaded_config} == adapter.loaded_config
    again = loaded.encode(squares, list(adapter.questions))
    for a, b in zip(again, default_encoded, strict=True):
        for k in adapter.layers:
            torch.testing.assert_close(a.image_states[k], b.image_states[k], atol=0, rtol=0)
            for ta, tb in zip(a.text_states, b.text_states, strict=True):
                torch.testing.assert_close(ta[k], tb[k], atol=0, rtol=0)
    with pytest.raises(UnsupportedMllmError) as err:
        adapter.cls.from_pretrained(str(llama_folder))
    assert str(err.value) == f"{llama_folder} is not a {adapter.family} checkpoint (model_type 'llama')"


def test_missing_or_wrong_mllm_checkpoint(tmp_path, llama_folder):
    """The registry's refusals, each one line: no folder, no cached name, no config.json, no adapter."""
    expected = f"MLLM checkpoint not found at {tmp_path / 'nope'}: pass --mllm PATH to a local llava-hf folder or 'tiny'"
    with pytest.raises(MllmCheckpointNotFoundError) as err:
        build_mllm(str(tmp_path / "nope"))
    assert str(err.value) == expected
    with pytest.raises(MllmCheckpointNotFoundError, match="not found at llava-hf/not-in-the-cache"):
        build_mllm("llava-hf/not-in-the-cache")
    with pytest.raises(MllmCheckpointNotFoundError):  # a folder without config.json
        build_mllm(str(tmp_path))
    # A real checkpoint of another family: no adapter registered for it.
    with pytest.raises(UnsupportedMllmError, match=re.escape(f"{llama_folder} is a 'llama' checkpoint")):
        build_mllm(str(llama_folder))
