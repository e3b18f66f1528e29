"""The authors' LENS, point by point, in the model core (the fidelity table's rows 3-8).

Each fact below is taken from the authors' public code (GitHub jiazhen-code/LENS, commit 29c4959) and
names the file it came from; each test recomputes what that code computes from the fact itself (with
transformers' own ``LlamaModel`` where the authors use it, with plain torch ops elsewhere), so a switch
that is reverted or misread turns it red.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel

from lens_core import LensConfig, build_lens
from lens_core.descriptor import KeypointDescriptor, OfficialKeypointDescriptor, build_descriptor
from lens_core.geometry import grid_to_sam_coords
from lens_core.head import SegmentationHead, peak_normalize
from lens_core.keypoints import nms_keypoints
from lens_core.losses import attention_loss
from lens_train.training.presets import load_preset
from tests.helpers.authors_reference import authors_descriptor

TINY = load_preset("tiny").model
OFFICIAL = load_preset("official").model


def official(cfg: LensConfig, **changes) -> LensConfig:
    """``cfg`` with the authors' structure switched on (rows 3-8)."""
    switches = dict(head_input="full_sequence", final_norm=True, descriptor="official",
                    global_only_after_descriptor=True, coords="align_corners", keypoint_strict=True,
                    detach_subpixel=False, cls_position_std=1.0, train_iou_head=False)
    return dataclasses.replace(cfg, **{**switches, **changes})


def states(batch=2, prefix=5, text=7, d=TINY.hidden_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(prefix, d, generator=g), torch.randn(batch, 576, d, generator=g),
            torch.randn(batch, text, d, generator=g))


# ----------------------------------------------------------------------------- rows 3 and 4: the head


def authors_llama_model(cfg: LensConfig, head: SegmentationHead) -> LlamaModel:
    """The authors' head (``llava_backbone.py`` ``build_fusion_model``): a 2-layer ``LlamaModel`` from a fresh
    ``LlamaConfig`` (its default RMSNorm eps) with eager attention, loaded with our head's weights."""
    lcfg = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_size,
                       num_hidden_layers=2, rope_theta=cfg.rope_theta, attn_implementation="eager", vocab_size=8)
    model = LlamaModel(lcfg).eval()
    state = {f"layers.{i}.{k}": v for i, layer in enumerate(head.layers) for k, v in layer.state_dict().items()}
    state["norm.weight"] = head.norm.weight.detach()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) == {"embed_tokens.weight"} and not unexpected
    return model


def test_default_llama_config_eps_is_the_authors_head_eps():
    # llava_backbone.py build_fusion_model: a LlamaConfig with only sizes given -> its default eps.
    assert LlamaConfig().rms_norm_eps == OFFICIAL.rms_norm_eps == OFFICIAL.final_norm_eps == 1e-6


def test_full_sequence_head_is_the_authors_llama_model():
    """conditioner.py GroundingHeadWithLlamaModel.forward: the whole layer-k sequence, positions
    cumsum(mask) - 1, ``last_hidden_state`` (after the final norm), ``attentions[0]`` averaged over heads,
    the last text token's row over the image tokens, divided by its detached peak, clamped."""
    cfg = official(TINY)
    torch.manual_seed(0)
    head = SegmentationHead(config=cfg).eval()
    for p in head.parameters():  # non-trivial norms, so a missing or misplaced norm shows
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    model = authors_llama_model(cfg, head)
    prefix, image, text = states(batch=1)
    lengths = torch.tensor([text.shape[1]])
    sequence = torch.cat((prefix[None], image, text), dim=1)
    mask = torch.ones(1, sequence.shape[1], dtype=torch.long)
    with torch.no_grad():
        ref = model(inputs_embeds=sequence, attention_mask=mask, position_ids=(mask.cumsum(1) - 1),
                    output_attentions=True)
        out = head(image, text, lengths, prefix)
    p, n = prefix.shape[0], 576
    attn = ref.attentions[0].mean(dim=1)[0, -1, p : p + n]
    expected_map = (attn / attn.max()).clamp(1e-6, 1 - 1e-6).view(24, 24)
    torch.testing.assert_close(out.heatmap[0], expected_map, atol=1e-5, rtol=1e-4)
    hidden = ref.last_hidden_state[0]
    torch.testing.assert_close(out.image_features[0].flatten(1).T, hidden[p : p + n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.start_token[0], hidden[-1], atol=1e-5, rtol=1e-4)


def test_the_prefix_and_the_final_norm_change_what_the_head_computes():
    prefix, image, text = states()
    lengths = torch.tensor([7, 4])
    torch.manual_seed(0)
    full = SegmentationHead(config=official(TINY)).eval()
    paper = SegmentationHead(config=official(TINY, head_input="image_text", final_norm=False)).eval()
    paper.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("norm.")})
    with torch.no_grad():
        a, b = full(image, text, lengths, prefix), paper(image, text, lengths)
    assert not torch.allclose(a.heatmap, b.heatmap, atol=1e-4)
    assert not torch.allclose(a.start_token, b.start_token, atol=1e-3)
    # a (P, d) prefix is shared by the batch, as a (B, P, d) one
    with torch.no_grad():
        c = full(image, text, lengths, prefix.expand(2, -1, -1))
    torch.testing.assert_close(a.heatmap, c.heatmap)
    assert "norm.weight" in full.state_dict() and "norm.weight" not in paper.state_dict()


def test_full_sequence_without_prefix_is_refused_in_one_line():
    _, image, text = states()
    head = SegmentationHead(config=official(TINY))
    with pytest.raises(ValueError, match="pre-image prefix states") as err:
        head(image, text, torch.tensor([7, 7]))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="prefix_states must be"):
        head(image, text, torch.tensor([7, 7]), torch.randn(3, 5, TINY.hidden_size))


# ------------------------------------------------------------------------------- row 5: the descriptor


def their_tensors(desc: OfficialKeypointDescriptor) -> dict:
    """Our descriptor's tensors under the authors' key names (lens_train.interop.authors.KEY_MAP)."""
    from lens_train.interop.authors import KEY_MAP

    theirs = {}
    for name, tensor in desc.state_dict().items():
        ours = "descriptor." + name
        for their_prefix, our_prefix in KEY_MAP:
            if ours.startswith(our_prefix):
                theirs[their_prefix + ours[len(our_prefix):]] = tensor
    return theirs


def test_official_descriptor_is_the_authors():
    cfg = official(TINY)
    torch.manual_seed(1)
    desc = build_descriptor(cfg).eval()
    assert isinstance(desc, OfficialKeypointDescriptor)
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, cfg.hidden_size, 24, 24, generator=g)
    start = torch.randn(2, cfg.hidden_size, generator=g)
    points = torch.rand(2, 16, 2, generator=g) * 25 - 0.5  # some outside the grid: border values
    valid = torch.rand(2, 16, generator=g) > 0.4
    with torch.no_grad():
        ours = desc(features, start, points, valid)
        glob, keys = authors_descriptor(their_tensors(desc), features, start, points / 23, ~valid,
                                        heads=cfg.descriptor_heads)
    assert ours.shape == (2, 17, cfg.prompt_dim)
    torch.testing.assert_close(ours[:, 0], glob, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, 1:][valid], keys[valid], atol=1e-5, rtol=1e-4)


def test_official_descriptor_shapes_at_the_real_dimensions():
    with torch.device("meta"):
        desc = build_descriptor(OFFICIAL)
    shapes = {name: tuple(p.shape) for name, p in desc.named_parameters()}
    # conditioner.py: MultiheadAttention(4096, 32), FFN 4096 -> intermediate_size 11008 -> 4096, LayerNorms,
    # TransformerEncoderLayer(4096, nhead 32: default dim_feedforward 2048), text_hidden_fcs 4096 -> 4096 -> 256
    assert shapes["cross_attn.in_proj_weight"] == (3 * 4096, 4096)
    assert shapes["ffn.0.weight"] == (11008, 4096) and shapes["ffn.2.weight"] == (4096, 11008)
    assert shapes["encoder.linear1.weight"] == (2048, 4096) and shapes["encoder.self_attn.in_proj_weight"] == (3 * 4096, 4096)
    assert shapes["mlp.0.weight"] == (4096, 4096) and shapes["mlp.2.weight"] == (256, 4096)
    assert desc.encoder.self_attn.num_heads == desc.cross_attn.num_heads == 32
    assert desc.encoder.dropout.p == 0.1 and not desc.encoder.norm_first
    assert isinstance(build_descriptor(dataclasses.replace(OFFICIAL, descriptor="paper")), KeypointDescriptor)


# -------------------------------------------------------------- rows 6-8 and the rest, through the model


@pytest.fixture
def sam(tiny_sam):
    """A copy of the session's tiny SAM (building a LENS model freezes parts of it)."""
    import copy

    return copy.deepcopy(tiny_sam)


@pytest.fixture
def captured(monkeypatch):
    """What the descriptor and SAM's point encoder are handed in a forward."""
    def patch(lens):
        seen = {}
        desc_forward = lens.descriptor.forward

        def descriptor(image_features, start_token, points, keypoint_mask, **kw):
            seen["described"] = keypoint_mask.clone()
            seen["points"] = points
            return desc_forward(image_features, start_token, points, keypoint_mask, **kw)

        monkeypatch.setattr(lens.descriptor, "forward", descriptor)
        pe = lens.prompt_decoder.prompt_encoder.pe_layer
        pe_forward = pe.forward_with_coords

        def encode(coords, image_size):
            seen["sam_coords"] = coords.clone()
            return pe_forward(coords, image_size)

        monkeypatch.setattr(pe, "forward_with_coords", encode)
        return seen

    return patch


def run(lens, batch=2, seed=0):
    prefix, image, text = states(batch=batch, seed=seed)
    sam = torch.randn(batch, 256, 64, 64, generator=torch.Generator().manual_seed(seed))
    return lens(image, text, torch.tensor([7, 5][:batch]), sam, prefix_states=prefix,
                generator=torch.Generator().manual_seed(seed))


def test_global_only_dropout_leaves_the_descriptor_alone(sam, captured):
    """conditioner.py MLLM_Conditioner.forward: the p=0.9 dropout sets SAM's padding mask after the
    descriptor ran, so the descriptor's self-attention still saw every valid keypoint."""
    for after, expect_described in ((True, "valid"), (False, "used")):
        torch.manual_seed(0)
        lens = build_lens(official(TINY, global_only_prob=1.0, global_only_after_descriptor=after), copy.deepcopy(sam)).train()
        seen = captured(lens)
        out = run(lens)
        assert out.valid.any() and not out.used.any()  # every sample dropped to the global token
        assert torch.equal(seen["described"], getattr(out, expect_described))


def test_align_corners_coordinates_reach_sam(sam, captured):
    """conditioner.py: keypoints normalised by x / (g - 1) (cell 0 -> 0, cell 23 -> the frame's edge)."""
    assert grid_to_sam_coords(torch.tensor([0.0, 23.0]), 24, coords="align_corners").tolist() == [0.0, 1024.0]
    assert grid_to_sam_coords(torch.tensor([0.0, 23.0]), 24).tolist() == pytest.approx([512 / 24, 1024 - 512 / 24])
    for coords, scale, shift in (("align_corners", 1024 / 23, 0.0), ("cell_center", 1024 / 24, 0.5)):
        lens = build_lens(official(TINY, coords=coords), copy.deepcopy(sam)).eval()
        seen = captured(lens)
        out = run(lens)
        torch.testing.assert_close(seen["sam_coords"], (out.points + shift) * scale)


def test_strict_keypoint_threshold():
    """conditioner.py: valid_mask = k_scores > threshold (strict), threshold = ratio x peak."""
    heat = torch.zeros(1, 24, 24)
    heat[0, 2, 2], heat[0, 20, 20], heat[0, 10, 12] = 1.0, 0.5, 0.25
    _, loose = nms_keypoints(heat, min_ratio=0.5)
    _, strict = nms_keypoints(heat, min_ratio=0.5, strict=True)
    assert loose[0, :3].tolist() == [True, True, False]
    assert strict[0, :3].tolist() == [True, False, False]


def test_subpixel_gradient_reaches_the_heatmap_only_when_asked(sam, captured):
    """conditioner.py: the refined coordinates (differentiable grid_sample of the heatmap) feed the
    descriptor's grid_sample; SAM's point encoding runs under no_grad."""
    for detach in (True, False):
        lens = build_lens(official(TINY, detach_subpixel=detach), copy.deepcopy(sam)).eval()
        seen = captured(lens)
        out = run(lens)
        assert (seen["points"].grad_fn is None) == detach
        assert out.points.grad_fn is None
        if not detach:
            # the descriptions' gradient w.r.t. the heatmap, through the positions alone
            grad = torch.autograd.grad(seen["points"].sum(), out.heatmap, retain_graph=True)[0]
            assert grad.abs().sum() > 0


def test_cls_position_and_iou_head(tiny_sam):
    """conditioner.py: cls_token_pos = nn.Parameter(torch.randn(1, 1, 256)) (std 1); decoder.py freezes
    SAM's iou_prediction_head."""
    torch.manual_seed(0)
    authors = build_lens(official(TINY), copy.deepcopy(tiny_sam))
    paper = build_lens(dataclasses.replace(TINY), copy.deepcopy(tiny_sam))
    assert 0.8 < float(authors.prompt_decoder.cls_position.detach().std()) < 1.2
    assert float(paper.prompt_decoder.cls_position.detach().std()) < 0.05
    head_params = lambda m: [p.requires_grad for p in m.prompt_decoder.mask_decoder.iou_prediction_head.parameters()]
    assert not any(head_params(authors)) and all(head_params(paper))
    others = [p.requires_grad for n, p in authors.prompt_decoder.mask_decoder.named_parameters() if "iou_prediction" not in n]
    assert all(others)


# ----------------------------------------------------------------------------- row 7: L_attn's target


def test_attention_loss_authors_resampling():
    """train.py: the heatmap upsampled to 128 with bilinear align_corners=True; the target is the mask on
    the padded 1024 frame resized with mode 'nearest', then > 0.5."""
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(1, 24, 24, generator=g).clamp(0.01, 0.99)
    gt = torch.zeros(1024, 1024, dtype=torch.uint8)
    gt[100:613, 37:300] = 1  # edges that do not fall on 8-pixel boundaries
    up = F.interpolate(heat[None], (128, 128), mode="bilinear", align_corners=True)[0, 0]
    target = (F.interpolate(gt[None, None].float(), (128, 128), mode="nearest")[0, 0] > 0.5).float()
    expected = F.binary_cross_entropy(up, target)
    got = attention_loss(heat, [gt], [(1024, 1024)], size=128, align_corners=True, target_resize="nearest")
    torch.testing.assert_close(got, expected)
    other = attention_loss(heat, [gt], [(1024, 1024)], size=128)
    assert not torch.allclose(other, expected)


# --------------------------------------------------------------- row 10: Qwen2-VL's M-RoPE in the head


@pytest.fixture(scope="module")
def tiny_qwen2vl():
    from lens_cache.backbones.tiny_qwen2vl import build_tiny_qwen2vl

    return build_tiny_qwen2vl()


def test_mrope_positions_are_qwen2vl_get_rope_index(tiny_qwen2vl):
    """The head's 3-D ids equal transformers' ``Qwen2VLModel.get_rope_index`` for [prefix; image; text]."""
    from lens_core.head import mrope_positions

    model, processor = tiny_qwen2vl
    config = model.config
    prefix, text, grid = 7, 5, 24
    ids = torch.full((1, prefix + grid * grid + text), 11, dtype=torch.long)
    ids[0, prefix : prefix + grid * grid] = config.image_token_id
    types = (ids == config.image_token_id).int()
    merge = config.vision_config.spatial_merge_size
    reference, _ = model.model.get_rope_index(ids, mm_token_type_ids=types,
                                              image_grid_thw=torch.tensor([[1, grid * merge, grid * merge]]))
    assert torch.equal(mrope_positions(prefix, grid, text), reference[:, 0])


def test_mrope_rotary_is_qwen2vl_rotary(tiny_qwen2vl):
    """cos / sin of the head's M-RoPE equal ``Qwen2VLRotaryEmbedding``'s for the same ids and section."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    from lens_core.head import RotaryEmbedding, mrope_positions

    model, _ = tiny_qwen2vl
    text_config = model.config.text_config
    section = tuple(text_config.rope_parameters["mrope_section"])
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    ours = RotaryEmbedding(head_dim, theta=float(text_config.rope_parameters["rope_theta"]), mrope_section=section)
    theirs = Qwen2VLRotaryEmbedding(text_config)
    positions = mrope_positions(4, 24, 6)
    cos, sin = theirs(torch.zeros(1, dtype=torch.float32), positions[:, None, :])
    ours_cos, ours_sin = ours(positions)
    torch.testing.assert_close(ours_cos, cos[0, 0].float() if cos.dim() == 4 else cos[0].float())
    torch.testing.assert_close(ours_sin, sin[0, 0].float() if sin.dim() == 4 else sin[0].float())
    # and the head uses them: M-RoPE and 1-D positions give different heatmaps on the same weights
    cfg = dataclasses.replace(TINY, rope="mrope", mrope_section=(2, 3, 3))
    torch.manual_seed(0)
    mrope = SegmentationHead(config=cfg).eval()
    flat = SegmentationHead(config=dataclasses.replace(cfg, rope="1d")).eval()
    flat.load_state_dict(mrope.state_dict())
    _, image, text = states()
    with torch.no_grad():
        assert not torch.allclose(mrope(image, text, torch.tensor([7, 5])).heatmap,
                                  flat(image, text, torch.tensor([7, 5])).heatmap, atol=1e-5)
