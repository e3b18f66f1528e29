"""The LENS model: head against transformers' LLaMA layer, shapes at the real dimensions,
gradients, determinism, ablations, batching and input checks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from lens_core import LensConfig, build_lens
from lens_core.descriptor import KeypointDescriptor
from lens_core.head import SegmentationHead, peak_normalize
from lens_core.losses import attention_loss
from lens_train.training.presets import load_preset

TINY = load_preset("tiny").model


def make_inputs(batch=3, text_len=9, d=TINY.hidden_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 576, d, generator=g)
    text = torch.randn(batch, text_len, d, generator=g)
    lengths = torch.tensor([text_len, max(1, text_len - 4), max(1, text_len - 2)][:batch])
    sam = torch.randn(batch, 256, 64, 64, generator=g)
    return image, text, lengths, sam


def llama_layer_pair(cfg: LensConfig, seed=0):
    lcfg = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                       intermediate_size=cfg.mlp_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                       num_hidden_layers=2, attn_implementation="eager")
    torch.manual_seed(seed)
    layers = [LlamaDecoderLayer(lcfg, layer_idx=i).eval() for i in range(2)]
    for layer in layers:  # non-trivial norms so a norm bug shows
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                p.data.uniform_(0.5, 1.5)
    return lcfg, layers


def test_head_layers_equal_transformers_llama_layers_and_attention():
    """Warm-started from LlamaDecoderLayer weights, the head computes what LLaMA computes."""
    lcfg, layers = llama_layer_pair(TINY)
    head = SegmentationHead(config=TINY).eval()
    head.load_decoder_layers([l.state_dict() for l in layers])
    image, text, _, _ = make_inputs(batch=1)
    lengths = torch.tensor([text.shape[1]])
    x = torch.cat((image, text), dim=1)
    rope = LlamaRotaryEmbedding(lcfg)
    pos = torch.arange(x.shape[1])[None]
    cos_sin = rope(x, pos)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    # transformers' eager attention returns the weights when the attention module is called directly
    h_in = layers[0].input_layernorm(x)
    attn_out, weights = layers[0].self_attn(hidden_states=h_in, attention_mask=mask, position_embeddings=cos_sin)
    y1 = layers[0](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    y2 = layers[1](y1, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    out = head(image, text, lengths)
    expected_map = weights.mean(1)[0, -1, :576]
    expected_map = (expected_map / expected_map.max()).clamp(1e-6, 1 - 1e-6).view(24, 24)
    torch.testing.assert_close(out.heatmap[0], expected_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.start_token[0], y2[0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.image_features[0, :, 2, 5], y2[0, 2 * 24 + 5], atol=1e-4, rtol=1e-4)


#: The tiny head as Qwen2-VL's decoder: q/k/v biases, grouped-query attention (4 query heads, 2 KV heads).
TINY_QWEN2 = LensConfig.from_dict({**TINY.to_dict(), "layer_type": "qwen2", "num_key_value_heads": 2,
                                   "rms_norm_eps": 1e-6, "rope_theta": 1e6})


def qwen2_layer_pair(cfg: LensConfig, seed=0):
    qcfg = Qwen2Config(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.mlp_size,
                       rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, num_hidden_layers=2,
                       attn_implementation="eager")
    torch.manual_seed(seed)
    layers = [Qwen2DecoderLayer(qcfg, layer_idx=i).eval() for i in range(2)]
    for layer in layers:  # non-trivial norms and biases so a norm or bias bug shows
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                p.data.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.data.normal_(0.0, 0.5)
    return qcfg, layers


def test_head_layers_equal_transformers_qwen2_layers_and_attention():
    """A head configured as Qwen2 (biases, 2 KV heads for 4 query heads) warm-started from
    Qwen2DecoderLayer weights computes what Qwen2 computes, heatmap included."""
    qcfg, layers = qwen2_layer_pair(TINY_QWEN2)
    assert qcfg.rope_parameters["rope_theta"] == 1e6 and layers[0].self_attn.num_key_value_groups == 2
    head = SegmentationHead(config=TINY_QWEN2).eval()
    head.load_decoder_layers([l.state_dict() for l in layers])  # strict
    image, text, _, _ = make_inputs(batch=1)
    lengths = torch.tensor([text.shape[1]])
    x = torch.cat((image, text), dim=1)
    pos = torch.arange(x.shape[1])[None]
    cos_sin = Qwen2RotaryEmbedding(qcfg)(x, pos)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        _, weights = layers[0].self_attn(hidden_states=layers[0].input_layernorm(x), attention_mask=mask,
                                         position_embeddings=cos_sin)
        y1 = layers[0](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        y2 = layers[1](y1, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        ours1, _ = head.layers[0](x, *head.rotary(torch.arange(x.shape[1])))
        out = head(image, text, lengths)
    torch.testing.assert_close(ours1, y1, atol=1e-5, rtol=1e-5)
    expected_map = weights.mean(1)[0, -1, :576]
    expected_map = (expected_map / expected_map.max()).clamp(1e-6, 1 - 1e-6).view(24, 24)
    torch.testing.assert_close(out.heatmap[0], expected_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.start_token[0], y2[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_features[0, :, 2, 5], y2[0, 2 * 24 + 5], atol=1e-5, rtol=1e-5)


def test_llama_head_with_grouped_query_attention_equals_transformers():
    """num_key_value_heads reaches the LLaMA layer too (LLaMA-2-70B / LLaMA-3 style GQA)."""
    cfg = LensConfig.from_dict({**TINY.to_dict(), "num_key_value_heads": 1})
    lcfg = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, num_key_value_heads=1,
                       intermediate_size=cfg.mlp_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                       num_hidden_layers=1, attn_implementation="eager")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(lcfg, layer_idx=0).eval()
    head = SegmentationHead(config=cfg).eval()
    head.load_decoder_layers([layer.state_dict(), layer.state_dict()])
    x = make_inputs(batch=1)[0][:, :40]
    pos = torch.arange(x.shape[1])[None]
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=LlamaRotaryEmbedding(lcfg)(x, pos))
        for return_attention in (True, False):  # the eager (heatmap) and the SDPA path
            ours, _ = head.layers[0](x, *head.rotary(torch.arange(x.shape[1])), return_attention=return_attention)
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_head_layer_type_shapes_and_strictness():
    """The parameter layout follows layer_type: a LLaMA state dict does not load into a Qwen2 head
    (missing biases), nor a Qwen2 one into a LLaMA head (unexpected biases); bad settings are refused."""
    names = set(SegmentationHead(config=TINY_QWEN2).layers[0].state_dict())
    _, qwen_layers = qwen2_layer_pair(TINY_QWEN2)
    assert names == set(qwen_layers[0].state_dict())
    assert {n for n in names if n.endswith(".bias")} == {f"self_attn.{p}_proj.bias" for p in "qkv"}
    assert SegmentationHead(config=TINY_QWEN2).layers[0].self_attn.k_proj.weight.shape == (32, 64)
    _, llama_layers = llama_layer_pair(TINY)
    with pytest.raises(RuntimeError, match="q_proj.bias"):
        SegmentationHead(config=TINY_QWEN2).load_decoder_layers([l.state_dict() for l in llama_layers])
    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key"):
        SegmentationHead(config=TINY).load_decoder_layers([l.state_dict() for l in qwen_layers])
    with pytest.raises(ValueError, match="layer_type"):
        LensConfig.from_dict({**TINY.to_dict(), "layer_type": "mistral"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LensConfig.from_dict({**TINY.to_dict(), "num_key_value_heads": 3})
    # a config written before these fields existed means what it meant: LLaMA, multi-head
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("layer_type", "num_key_value_heads")}
    assert LensConfig.from_dict(old) == TINY and TINY.layer_type == "llama" and TINY.kv_heads == TINY.num_heads


def _reference_llama_head(head: SegmentationHead, image, text, lengths):
    """The LLaMA head as it computed before the layer type became a setting, written out with
    functional ops on the head's own parameters (same operations, same order): an independent
    recomputation the head must match bit for bit."""
    cfg = head.config
    d, heads = cfg.hidden_size, cfg.num_heads
    hd = d // heads

    def norm(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(x.dtype)

    def rot(x):
        return torch.cat((-x[..., hd // 2:], x[..., : hd // 2]), dim=-1)

    def layer(x, p, cos, sin, eager):
        b, n, _ = x.shape
        h = norm(x, p["input_layernorm.weight"])
        q, k, v = (F.linear(h, p[f"self_attn.{c}_proj.weight"]).view(b, n, heads, hd).transpose(1, 2) for c in "qkv")
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        if eager:
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd)
            probs = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)
            out = probs.to(v.dtype) @ v
        else:
            probs, out = None, F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(out.transpose(1, 2).reshape(b, n, d), p["self_attn.o_proj.weight"])
        h = norm(x, p["post_attention_layernorm.weight"])
        mlp = F.linear(F.silu(F.linear(h, p["mlp.gate_proj.weight"])) * F.linear(h, p["mlp.up_proj.weight"]),
                       p["mlp.down_proj.weight"])
        return x + mlp, probs

    params = [dict(l.named_parameters()) for l in head.layers]
    x = torch.cat((image, text), dim=1)
    n = x.shape[1]
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x, probs = layer(x, params[0], cos, sin, eager=True)
    t2i = probs.mean(dim=1)[:, 576:, :576]
    rows = torch.arange(text.shape[1])
    if cfg.heatmap_from == "last":
        select = (rows[None, :] == (lengths - 1)[:, None]).float()
    else:
        select = (rows[None, :] < lengths[:, None]).float() / lengths[:, None].float()
    grounding = torch.einsum("bt,bti->bi", select, t2i)
    heatmap = peak_normalize(grounding, detach_peak=cfg.detach_peak).view(-1, 24, 24)
    x, _ = layer(x, params[1], cos, sin, eager=False)
    batch = x.shape[0]
    features = x[:, :576].transpose(1, 2).reshape(batch, d, 24, 24)
    start = x[torch.arange(batch), 576 + lengths - 1]
    return heatmap, features, start


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_llama_head_is_bit_identical_to_its_reference(mode):
    """The LLaMA path (every existing preset and checkpoint) is unchanged by the layer-type setting:
    a fixed-seed head's outputs and gradients equal, bit for bit, the pre-change computation."""
    cfg = LensConfig.from_dict({**TINY.to_dict(), "heatmap_from": mode})
    torch.manual_seed(123)
    head = SegmentationHead(config=cfg)
    g = torch.Generator().manual_seed(7)
    image, text = torch.randn(2, 576, 64, generator=g), torch.randn(2, 9, 64, generator=g)
    lengths = torch.tensor([9, 5])
    out = head(image, text, lengths)
    (out.heatmap.square().sum() + out.image_features.mean() + out.start_token.sum()).backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad()
    heatmap, features, start = _reference_llama_head(head, image, text, lengths)
    (heatmap.square().sum() + features.mean() + start.sum()).backward()
    assert torch.equal(out.heatmap, heatmap)
    assert torch.equal(out.image_features, features)
    assert torch.equal(out.start_token, start)
    for name, p in head.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def test_heatmap_modes_and_right_padding_invariance():
    image, text, _, _ = make_inputs(batch=1, text_len=6)
    padded = torch.cat((text, torch.randn(1, 5, TINY.hidden_size)), dim=1)
    for mode in ("last", "mean"):
        cfg = LensConfig.from_dict({**TINY.to_dict(), "heatmap_from": mode})
        torch.manual_seed(0)
        head = SegmentationHead(config=cfg).eval()
        a = head(image, text, torch.tensor([6]))
        b = head(image, padded, torch.tensor([6]))
        torch.testing.assert_close(a.heatmap, b.heatmap, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.start_token, b.start_token, atol=1e-5, rtol=1e-5)
        assert a.heatmap.max().item() == pytest.approx(1 - 1e-6, abs=1e-6)
    torch.manual_seed(0)
    last = SegmentationHead(config=TINY).eval()(image, text, torch.tensor([6])).heatmap
    torch.manual_seed(0)
    mean_cfg = LensConfig.from_dict({**TINY.to_dict(), "heatmap_from": "mean"})
    mean = SegmentationHead(config=mean_cfg).eval()(image, text, torch.tensor([6])).heatmap
    assert not torch.allclose(last, mean)


def test_peak_normalize_gradient_detached_vs_exact():
    """Undetached, the normalised map is scale-free, so by Euler's identity the gradient of any
    loss of it is orthogonal to the grounding itself; the official detached form is not (it
    pushes the whole map down), which is what flattens a randomly initialised head."""
    torch.manual_seed(0)
    grounding = torch.rand(2, 36) * 0.02 + 0.001
    gts = [torch.zeros(6, 6, dtype=torch.uint8) for _ in range(2)]
    gts[0][1:3, 1:4] = 1
    gts[1][3:6, 0:2] = 1
    dots = {}
    for detach in (True, False):
        g = grounding.clone().requires_grad_(True)
        heatmap = peak_normalize(g, detach_peak=detach)
        assert heatmap.amax(dim=1).tolist() == pytest.approx([1 - 1e-6] * 2, abs=1e-7)
        # the forward pass is the same either way: g / max(g), clamped into (0, 1)
        torch.testing.assert_close(heatmap, (grounding / grounding.amax(1, keepdim=True)).clamp(1e-6, 1 - 1e-6))
        attention_loss(heatmap.view(2, 6, 6), gts, [(1024, 1024)] * 2, size=6).backward()
        dots[detach] = (g.grad * grounding).sum(dim=1) / (g.grad.norm(dim=1) * grounding.norm(dim=1))
    assert dots[False].abs().max().item() < 1e-4
    assert (dots[True] > 0.1).all()  # a descent step scales the whole map down


def test_detach_peak_switch_reaches_the_head():
    image, text, _, _ = make_inputs(batch=2, text_len=6)
    grads = {}
    for detach in (True, False):
        cfg = LensConfig.from_dict({**TINY.to_dict(), "detach_peak": detach})
        torch.manual_seed(0)
        head = SegmentationHead(config=cfg)
        out = head(image, text, torch.tensor([6, 4]))
        out.heatmap.square().sum().backward()
        grads[detach] = (out.heatmap.detach(), head.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert not torch.allclose(grads[True][1], grads[False][1])


def test_real_dimension_shapes_on_meta_device():
    """LLaVA-1.5-7B's dimensions (d=4096, 32 heads, 11008) without allocating memory."""
    cfg = load_preset("official").model
    assert (cfg.hidden_size, cfg.num_heads, cfg.mlp_size) == (4096, 32, 11008)
    with torch.device("meta"):
        head = SegmentationHead(config=cfg)
        descriptor = KeypointDescriptor(dim=4096, num_heads=cfg.descriptor_heads, out_dim=256, neighborhood=3)
        image = torch.empty(2, 576, 4096)
        text = torch.empty(2, 40, 4096)
        prefix = torch.empty(35, 4096)  # BOS, the system prompt and USER: of LLaVA-1.5 (official: full_sequence)
        out = head(image, text, torch.tensor([40, 31], device="meta"), prefix)
        assert out.heatmap.shape == (2, 24, 24)
        assert out.image_features.shape == (2, 4096, 24, 24)
        assert out.start_token.shape == (2, 4096)
        points = torch.empty(2, 16, 2)
        mask = torch.empty(2, 16, dtype=torch.bool)
        desc = descriptor(out.image_features, out.start_token, points, mask)
        assert desc.shape == (2, 17, 256)
    head_params = sum(p.numel() for p in head.parameters())
    # two LLaMA-7B layers and the final RMSNorm of the authors' LlamaModel head
    assert head_params == 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096


def test_real_sam_decoder_dimensions(tiny_sam):
    """The tiny SAM keeps SAM's real prompt/decoder interface: 256-d prompts, 256x64x64 embeddings."""
    lens = build_lens(TINY, tiny_sam).eval()
    image, text, lengths, sam = make_inputs(batch=2)
    with torch.no_grad():
        out = lens(image, text, lengths, sam)
    assert out.low_res_logits.shape == (2, 256, 256)
    assert out.points.shape == (2, 16, 2) and out.valid.shape == (2, 16)
    masks = lens.masks_at_original_size(out.low_res_logits, torch.tensor([[768, 1024], [1024, 683]]), torch.tensor([[480, 640], [600, 400]]))
    assert [m.shape for m in masks] == [(480, 640), (600, 400)]


def test_gradients_reach_trainable_parts_only(tiny_sam):
    sam = copy.deepcopy(tiny_sam)
    lens = build_lens(TINY, sam).train()
    image, text, lengths, emb = make_inputs(batch=2)
    out = lens(image, text, lengths, emb, generator=torch.Generator().manual_seed(1))
    (out.low_res_logits.mean() + out.heatmap.mean()).backward()
    for part in (lens.head, lens.descriptor, lens.prompt_decoder.mask_decoder):
        grads = [p.grad for p in part.parameters() if p.requires_grad and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    assert lens.prompt_decoder.cls_position.grad is not None
    for p in sam.prompt_encoder.parameters():
        assert not p.requires_grad and p.grad is None
    for p in sam.image_encoder.parameters():
        assert p.grad is None
    names = {n for n, _ in lens.named_parameters()}
    assert not any(n.startswith("image_encoder") for n in names)


def test_determinism_under_a_seed(tiny_sam):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        lens = build_lens(TINY, copy.deepcopy(tiny_sam)).train()
        outs.append(lens(*make_inputs(batch=2), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(outs[0].low_res_logits, outs[1].low_res_logits)
    assert torch.equal(outs[0].used, outs[1].used)


def test_batch_of_images_equals_one_by_one(tiny_sam):
    torch.manual_seed(0)
    lens = build_lens(TINY, tiny_sam).eval()
    image, text, lengths, emb = make_inputs(batch=3)
    with torch.no_grad():
        batched = lens(image, text, lengths, emb)
        for b in range(3):
            single = lens(image[b : b + 1], text[b : b + 1, : lengths[b]], lengths[b : b + 1], emb[b : b + 1])
            torch.testing.assert_close(single.low_res_logits[0], batched.low_res_logits[b], atol=1e-4, rtol=1e-4)
            assert torch.equal(single.points[0], batched.points[b])


def test_ablation_switches_shape_the_prompt(tiny_sam, monkeypatch):
    seen = []
    real = tiny_sam.mask_decoder.predict_masks

    def spy(**kw):
        seen.append(kw["sparse_prompt_embeddings"].shape[1])
        return real(**kw)

    monkeypatch.setattr(tiny_sam.mask_decoder, "predict_masks", spy)
    image, text, lengths, emb = make_inputs(batch=1)
    results = {}
    for name, over in {
        "full": {},
        "no_keypoint": {"use_keypoint_description": False},
        "no_global": {"use_global_description": False},
    }.items():
        seen.clear()
        torch.manual_seed(0)
        lens = build_lens(LensConfig.from_dict({**TINY.to_dict(), **over}), tiny_sam).eval()
        with torch.no_grad():
            out = lens(image, text, lengths, emb)
        results[name] = (seen[0], int(out.valid.sum()), int(out.used.sum()))
    full_tokens, valid, used = results["full"]
    assert full_tokens == 1 + valid == 1 + used
    assert results["no_keypoint"][0] == 1 and results["no_keypoint"][2] == 0
    assert results["no_global"][0] == results["no_global"][1]
    with pytest.raises(ValueError, match="at least one"):
        LensConfig.from_dict({**TINY.to_dict(), "use_keypoint_description": False, "use_global_description": False})


def test_global_only_dropout_probability(tiny_sam):
    cfg = LensConfig.from_dict({**TINY.to_dict(), "global_only_prob": 1.0})
    lens = build_lens(cfg, tiny_sam)
    image, text, lengths, emb = make_inputs(batch=2)
    out = lens.train()(image, text, lengths, emb)
    assert not out.used.any() and out.valid.any()
    with torch.no_grad():
        assert lens.eval()(image, text, lengths, emb).used.any()  # never at inference


def test_wrong_shapes_get_clear_errors(tiny_sam):
    lens = build_lens(TINY, tiny_sam).eval()
    image, text, lengths, emb = make_inputs(batch=2)
    with pytest.raises(ValueError, match=r"image_states must be \(B, 576, 64\)"):
        lens(image[:, :500], text, lengths, emb)
    with pytest.raises(ValueError, match="another backbone"):
        lens(torch.randn(2, 576, 4096), text, lengths, emb)
    with pytest.raises(ValueError, match="text_lengths"):
        lens(image, text, torch.tensor([0, 3]), emb)
    with pytest.raises(ValueError, match="SAM image embeddings"):
        lens(image, text, lengths, emb[:, :, :32])


def test_warm_start_is_strict():
    head = SegmentationHead(config=TINY)
    _, layers = llama_layer_pair(TINY)
    state = layers[0].state_dict()
    state.pop("mlp.up_proj.weight")
    with pytest.raises(RuntimeError, match="up_proj"):
        head.load_decoder_layers([state, layers[1].state_dict()])


@pytest.mark.parametrize("layer", [14, 30])
def test_warm_started_head_is_the_mllm_decoder_layer(toy_sam_store, layer):
    """An untrained head warm-started from a store computes, in its first layer, the MLLM's decoder
    layer k on the cached layer-k states (same positions 0..L-1, same causal mask), for each cached k."""
    from lens_train.training.stores import read_warm_start

    store, mllm = toy_sam_store.store, toy_sam_store.extractor.mllm
    sizes = store.warm_start["head"]  # the tiny LLaVA's RMSNorm eps (1e-6) is not the tiny preset's (1e-5)
    cfg = LensConfig.from_dict({**TINY.to_dict(), **sizes})
    warm = read_warm_start(store, layer=layer, config=cfg)
    assert warm.layers == (layer, layer + 1) and warm.notes == ()
    torch.manual_seed(0)
    head = SegmentationHead(config=cfg).eval()
    head.load_decoder_layers(warm.state_dicts)

    sample = store.read_query(0, layer)
    x = torch.cat([torch.from_numpy(sample["image_states"]), torch.from_numpy(sample["text_states"])]).float()[None]
    length = x.shape[1]
    language_model = mllm.model.model.language_model
    positions = torch.arange(length)[None]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = language_model.layers[layer](x, attention_mask=mask, position_ids=positions,
                                             position_embeddings=language_model.rotary_emb(x, positions))
        ours, _ = head.layers[0](x, *head.rotary(torch.arange(length)))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
