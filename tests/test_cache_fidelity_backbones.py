"""FIDELITY.md rows 10 and 11: the Qwen2-VL-2B and LLaVA-OneVision-7B runs as the authors' code builds them
(jiazhen-code/LENS at 29c4959; facts only). Each test names the authors' files its facts come from.

- Row 10 (``configs/qwen2vl_2b.yaml`` over the ``lens/config.py`` dataclass defaults, which that yaml does not
  include ``configs/default.yaml`` for; ``lens/models/backbones/qwen2vl_backbone.py``, ``generic.py``,
  ``base.py``; ``lens/models/conditioner.py``; ``train.py``; ``eval.py``): the ``qwen2vl-2b`` preset, and the
  3-D M-RoPE ids the head builds for a store's query equal the ones the Qwen2-VL forward itself uses.
- Row 11 (``configs/llava_onevision_7b.yaml``, ``lens/models/backbones/llava_onevision_backbone.py``): the
  ``onevision-7b`` preset and the adapter's default ``image_tokens="base"``: exactly the 729 base-grid tokens,
  SAM's frame resized to 384 with mean/std 0.5, states = a plain full forward of that 729-token prompt.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens_cache.backbones import build_extractor
from lens_cache.backbones.defaults import MODEL_TYPE_DEFAULTS
from lens_cache.backbones.onevision import OnevisionBackbone
from lens_core.head import mrope_positions
from lens_train.training.presets import load_preset
from tests.helpers.images import padded_squares

ATOL = 1e-5

#: What the authors' run on each backbone is, field by field of this project's configs, and where it comes from.
#: Shared by both backbones (their conditioner, train.py and eval.py do not depend on the backbone).
AUTHORS_COMMON_MODEL = {
    "heatmap_from": "last",  # conditioner.py KeypointExtractor._select_query_tokens: text_indices[[-1]]
    "keypoint_min_ratio": 0.7,  # config.py ModelConfig.kp_thresh (neither backbone yaml sets it; default.yaml's 0.4 is not read)
    "keypoint_strict": True,  # conditioner.py: k_scores > threshold
    "max_keypoints": 16, "neighborhood": 3, "nms_radius": 4.0,  # config.py KeypointConfig
    "descriptor": "official",  # conditioner.py GroundingHeadWithLlamaModel (post-LN MHA + FFN, encoder layer, MLP)
    "descriptor_heads": 32, "descriptor_ffn": 11008,  # config.py GroundingHeadConfig num_heads / intermediate_size
    "global_only_prob": 0.9, "global_only_after_descriptor": True,  # conditioner.py MLLM_Conditioner.forward
    "coords": "align_corners", "detach_subpixel": False, "cls_position_std": 1.0,  # conditioner.py
    "train_iou_head": False,  # decoder.py
    "head_input": "full_sequence",  # conditioner.py: the fusion model reads the whole layer-k sequence
    "final_norm": True,  # backbones/base.py build_fusion_model: type(text_model)(config) keeps its final norm
}
AUTHORS_COMMON_TRAIN = {
    "bce_weight": 4.0, "dice_weight": 2.0,  # config.py DecoderConfig (decoder.py: bce_weight*bce + dice_weight*dice)
    "lr": 5e-5, "batch_size": 2, "grad_accum": 4,  # both yamls' train.base_lr / batch_size / gradient_accumulation_steps
    "betas": (0.9, 0.95), "weight_decay": 0.0,  # config.py TrainConfig
    "lr_schedule": "constant", "warmup_steps": 0, "grad_clip": None,  # train.py: CosineAnnealingLR(T_max=steps*10^7), no clip
    "precision": "bf16-pure",  # train.py: full.to(torch.bfloat16)
    "threshold": 0.6,  # eval.py: sigmoid() > 0.6
    "attn_target_resize": "nearest",  # train.py: F.interpolate(mode='nearest')
}
#: sample_rates "9,1,0,1" (sem_seg, refer_seg, vqa, reason_seg) in both yamls.
AUTHORS_MIX = {"semantic": 9, "referring": 1, "reasoning": 1}


def _check_common(preset) -> None:
    model, train = preset.model, preset.train
    ours = {key: getattr(model, key) for key in AUTHORS_COMMON_MODEL}
    assert ours == AUTHORS_COMMON_MODEL
    ours = {key: getattr(train, key) for key in AUTHORS_COMMON_TRAIN}
    assert {**ours, "betas": tuple(ours["betas"])} == AUTHORS_COMMON_TRAIN
    assert {k: v for k, v in dict(train.mix).items() if v} == AUTHORS_MIX


# ---------------------------------------------------------------------------------------------------- row 10


def test_qwen2vl_2b_preset_is_the_authors_run():
    """configs/qwen2vl_2b.yaml: selected_layer_id 20, grounding_init_start_layer 20, 576 tokens from 672 px;
    qwen2vl_backbone.py: the fusion model is the backbone's own Qwen2-VL text model (its config: eps 1e-6,
    mrope_section 16/24/24, theta 1e6), with its final norm, fed the backbone's captured 3-D M-RoPE ids
    (fusion_explicit_position_ids False + the forward-pre hook)."""
    preset = load_preset("qwen2vl-2b")
    _check_common(preset)
    model = preset.model
    assert (preset.main_layer, preset.late_layer) == (20, 27)
    assert MODEL_TYPE_DEFAULTS["qwen2_vl"].warm_start == (20, 21) and MODEL_TYPE_DEFAULTS["qwen2_vl"].main_layer == 20
    assert (model.grid_size, model.hidden_size, model.num_heads, model.kv_heads, model.mlp_size) == (24, 1536, 12, 2, 8960)
    assert (model.rope, model.mrope_section, model.rope_theta, model.layer_type) == ("mrope", (16, 24, 24), 1e6, "qwen2")
    assert (model.rms_norm_eps, model.final_norm_eps) == (1e-6, 1e-6)  # Qwen2-VL-2B's rms_norm_eps, both norms


def test_qwen2vl_2b_head_is_a_two_layer_qwen2vl_text_model():
    """The preset's head has the parameters of the authors' fusion model: Qwen2VLTextModel with 2 layers,
    embed_tokens deleted (base.py build_fusion_model), final norm included."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    from lens_core.head import SegmentationHead

    preset = load_preset("qwen2vl-2b")
    text = Qwen2VLTextConfig(vocab_size=1, hidden_size=1536, intermediate_size=8960, num_hidden_layers=2,
                             num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    with torch.device("meta"):
        fusion = Qwen2VLTextModel(text)
        del fusion.embed_tokens
        head = SegmentationHead(config=preset.model)
    assert sum(p.numel() for p in head.parameters()) == sum(p.numel() for p in fusion.parameters())
    assert fusion.norm.variance_epsilon == preset.model.final_norm_eps


def test_head_mrope_ids_for_a_tiny_qwen2vl_store_are_the_models(tmp_path, toy_sam_file):
    """The ids the head builds for a store's query (lens_core.head.mrope_positions with P = the store's prefix,
    g = 24, L_t = the query's cached length) are the ones the tiny Qwen2-VL computes itself for the real
    processor input of that prompt (get_rope_index), i.e. what the authors' hook captures."""
    from lens_cache.build import build_cache
    from lens_manifests import build_manifest
    from lens_train.testing import small_synthetic

    root = small_synthetic(tmp_path / "synthetic", images=2)
    manifest = build_manifest("synthetic-reason:val", root).take([0])
    extractor = build_extractor(mllm="tiny-qwen2vl", sam=f"toy:{toy_sam_file}", layers=(20,), device="cpu")
    store = build_cache(manifest, tmp_path / "store", lambda: extractor, spec="synthetic-reason:val",
                        batch_size=1, progress=False)
    prefix_ids = store.prefix_token_ids
    prefix = store.prefix_states(20)
    P = prefix.shape[0]
    assert P == len(prefix_ids) > 0
    text_length = int(store.text_len[0])
    row = manifest.to_pylist()[0]

    mllm = extractor.mllm
    question = mllm.question_for(row["text"], row["is_sentence"])
    inputs = mllm.processor(text=mllm.prompt_for(question), images=Image.new("RGB", (1024, 1024)), return_tensors="pt")
    ids = inputs["input_ids"]
    tokens = mllm.processor.tokenizer.convert_ids_to_tokens(prefix_ids)
    assert tokens[-1] == "<|vision_start|>" and ids[0, :P].tolist() == prefix_ids
    assert ids.shape[1] == P + 576 + text_length  # the store's query is the whole prompt
    assert store.read_query(0, 20)["text_states"].shape[0] == text_length
    kwargs = {"image_grid_thw": inputs["image_grid_thw"]}
    if "mm_token_type_ids" in inputs:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    expected, _ = mllm.model.model.get_rope_index(ids, **kwargs)
    ours = mrope_positions(P, 24, text_length)
    assert torch.equal(ours, expected[:, 0])
    # the prefix states the head reads are the MLLM's own for those tokens (one full forward)
    with torch.inference_mode():
        hidden = mllm.model(**inputs, output_hidden_states=True).hidden_states[20][0, :P]
    np.testing.assert_allclose(prefix.astype(np.float32), hidden.numpy(), atol=2e-3)  # float16 storage


# ---------------------------------------------------------------------------------------------------- row 11


def test_onevision_7b_preset_is_the_authors_run():
    """configs/llava_onevision_7b.yaml: selected_layer_id 14, grounding_init_start_layer 14 (warm start 14/15),
    729 tokens, image_hw 384; llava_onevision_backbone.py: 1-D positions (fusion_explicit_position_ids True:
    cumsum(mask) - 1), the fusion model the backbone's own Qwen2 text model (base.py), final norm included."""
    preset = load_preset("onevision-7b")
    _check_common(preset)
    model = preset.model
    assert (preset.main_layer, preset.late_layer) == (14, 27)
    row = MODEL_TYPE_DEFAULTS["llava_onevision"]
    assert (row.main_layer, row.warm_start, row.grid_size) == (14, (14, 15), 27)
    assert (model.grid_size, model.num_image_tokens, model.rope) == (27, 729, "1d")
    assert model.final_norm_eps == model.rms_norm_eps


@pytest.fixture(scope="module")
def onevision() -> OnevisionBackbone:
    return OnevisionBackbone.tiny(layers=(14, 20), device="cpu", dtype=torch.float32)


def test_onevision_default_is_the_authors_729_base_tokens(onevision):
    """The default adapter setting, recorded in the identity: 729 image tokens in the prompt, no tile."""
    assert onevision.image_tokens == "base"
    prefix, suffix = onevision.prompt_token_ids("Can you segment the red circle in this image?")
    assert sum(t == onevision.image_token_id for t in prefix + suffix) == 729
    assert onevision.num_image_tokens == 729 and onevision._sequence_image_tokens == 729
    assert onevision.identity["image_tokens"] == "base" and onevision.image_geometry == "sam-pad-1024-to-384"
    anyres = OnevisionBackbone(onevision.model, onevision.processor, name_or_path="tiny-onevision", layers=(14, 20),
                               image_tokens="anyres")
    from lens_cache.identity import feature_differences

    ours = {**onevision.identity, "image_geometry": onevision.image_geometry}
    theirs = {**anyres.identity, "image_geometry": anyres.image_geometry}
    keys = {key for key, _, _ in feature_differences(ours, theirs)}
    assert {"image_tokens", "image_geometry"} <= keys  # stores of the two ways are never mixed


def test_onevision_base_states_equal_a_full_forward_of_the_729_token_prompt(onevision):
    """llava_onevision_backbone.py encode: the SAM frame resized to 384 (bicubic), (x / 255 - 0.5) / 0.5,
    vision tower + projector -> 729 features scattered into the 729 <image> positions, the LM on
    inputs_embeds; the cached states (prefix shared, suffixes batched) = hidden_states[k] of one full forward."""
    squares = padded_squares()
    questions = [["Can you segment the red circle in this image?", "Which shape is left of the blue square?"],
                 ["What object would someone use to carry water on a long walk?"]]
    encoded = onevision.encode(squares, questions)
    model = onevision.model.model
    for square, qs, states in zip(squares, questions, encoded):
        frame = np.asarray(square.convert("RGB").resize((384, 384), Image.Resampling.BICUBIC), dtype=np.float32)
        pixels = torch.from_numpy((frame / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
        torch.testing.assert_close(onevision.base_pixel_values([square]), pixels, atol=1e-6, rtol=0)
        with torch.inference_mode():
            features = model.multi_modal_projector(model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1])
        assert features.shape == (1, 729, 64)
        for question, text_states in zip(qs, states.text_states):
            prefix, suffix = onevision.prompt_token_ids(question)
            ids = torch.tensor([prefix + suffix])
            image = (ids[0] == onevision.image_token_id).nonzero()[:, 0]
            assert len(image) == 729 and torch.equal(image, torch.arange(int(image[0]), int(image[0]) + 729))
            embeds = model.get_input_embeddings()(ids).clone()
            embeds[0, image] = features[0]
            with torch.inference_mode():
                hidden = onevision.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
            text = torch.arange(int(image[-1]) + 1, ids.shape[1])
            for k in (14, 20):
                torch.testing.assert_close(states.image_states[k], hidden[k][0, image], atol=ATOL, rtol=0)
                torch.testing.assert_close(text_states[k], hidden[k][0, text], atol=ATOL, rtol=0)
                torch.testing.assert_close(states.prefix_states[k], hidden[k][0, : int(image[0])], atol=ATOL, rtol=0)
    # the probe's attention maps use the same inputs
    maps = onevision.image_attention_by_layer(squares[0], questions[0][0])
    assert maps.shape == (28, 27, 27) and torch.isfinite(maps).all()
