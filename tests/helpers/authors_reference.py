"""The authors' LENS forward, recomputed from the facts of their code (GitHub jiazhen-code/LENS, 29c4959).

Written from what their files do, not from this project's modules: their head is a transformers
``LlamaModel`` (``llava_backbone.py`` ``build_fusion_model``; a fresh ``LlamaConfig``, eager attention);
their descriptor and SAM prompt are ``conditioner.py`` ``GroundingHeadWithLlamaModel.forward``; the mask
is ``decoder.py`` ``Decoder.decode_mask`` (SAM's ``MaskDecoder.forward``, ``multimask_output=False``).
Everything takes their checkpoint's key names. Keypoints come from ``lens_core.keypoints`` (NMS and the
Newton step, tested against the supplement on their own); everything else is plain torch here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel

from lens_core.keypoints import nms_keypoints, subpixel_refine

HEAD = "conditioner.conditioning_module."
DECODER = "net.visual_model.mask_decoder."


def authors_head(theirs: dict, *, heads: int, mlp: int, theta: float = 10000.0) -> LlamaModel:
    """Their fusion head: a 2-layer LlamaModel (default eps) holding ``theirs``'s fusion_model tensors."""
    d = theirs[HEAD + "fusion_model.norm.weight"].shape[0]
    config = LlamaConfig(hidden_size=d, num_attention_heads=heads, intermediate_size=mlp, num_hidden_layers=2,
                         rope_theta=theta, attn_implementation="eager", vocab_size=8)
    model = LlamaModel(config).eval()
    prefix = HEAD + "fusion_model."
    state = {k[len(prefix):]: v.float() for k, v in theirs.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) == {"embed_tokens.weight"} and not unexpected, (missing, unexpected)
    return model


def _mha(theirs: dict, name: str, q: torch.Tensor, kv: torch.Tensor, heads: int, key_padding=None) -> torch.Tensor:
    """nn.MultiheadAttention's forward from its tensors (in_proj packed q, k, v; out_proj)."""
    d = q.shape[-1]
    w, b = theirs[name + "in_proj_weight"].float(), theirs[name + "in_proj_bias"].float()
    split = lambda x, lo: (x @ w[lo : lo + d].T + b[lo : lo + d]).view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
    qq, kk, vv = split(q, 0), split(kv, d), split(kv, 2 * d)
    scores = qq @ kk.transpose(-1, -2) / math.sqrt(d // heads)
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(q.shape[0], q.shape[1], d)
    return out @ theirs[name + "out_proj.weight"].float().T + theirs[name + "out_proj.bias"].float()


def _ln(theirs: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), theirs[name + "weight"].float(), theirs[name + "bias"].float(), 1e-5)


def _linear(theirs: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ theirs[name + "weight"].float().T + theirs[name + "bias"].float()


def authors_descriptor(theirs: dict, features: torch.Tensor, start: torch.Tensor, points01: torch.Tensor,
                       padding: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Their descriptor in eval mode: (global (B, C), keypoints (B, K, C)).

    3x3 grid_sample(align_corners=True, padding_mode="border") around ``points01 * 2 - 1`` with steps of
    2 / (g - 1); MultiheadAttention(query = f_s) -> norm1(f_s + attn) -> norm2(x + FFN(x)), GELU; one post-LN
    TransformerEncoderLayer (ReLU) over [descriptions; f_s] with ``padding`` (B, K) masked; MLP d -> d -> C.
    """
    b, d, g, _ = features.shape
    k = points01.shape[1]
    steps = torch.tensor([-1.0, 0.0, 1.0]) * 2.0 / (g - 1)
    gy, gx = torch.meshgrid(steps, steps, indexing="ij")
    grid = (points01 * 2 - 1).view(b, k, 1, 1, 2) + torch.stack((gx, gy), -1).view(1, 1, 3, 3, 2)
    sampled = F.grid_sample(features.unsqueeze(1).expand(-1, k, -1, -1, -1).reshape(b * k, d, g, g),
                            grid.reshape(b * k, 3, 3, 2), mode="bilinear", padding_mode="border", align_corners=True)
    context = sampled.view(b, k, d, 9).permute(0, 1, 3, 2).reshape(b * k, 9, d)
    query = start.unsqueeze(1).repeat(1, k, 1).view(b * k, 1, d)
    x = _ln(theirs, HEAD + "norm1.", query + _mha(theirs, HEAD + "feature_aggregator.", query, context, heads))
    x = _ln(theirs, HEAD + "norm2.", x + _linear(theirs, HEAD + "ffn.2.", F.gelu(_linear(theirs, HEAD + "ffn.0.", x))))
    seq = torch.cat((x.view(b, k, d), start.unsqueeze(1)), dim=1)
    mask = torch.cat((padding, torch.zeros(b, 1, dtype=torch.bool)), dim=1)
    enc = HEAD + "encoder_layer.layers.0."
    seq = _ln(theirs, enc + "norm1.", seq + _mha(theirs, enc + "self_attn.", seq, seq, heads, mask))
    seq = _ln(theirs, enc + "norm2.", seq + _linear(theirs, enc + "linear2.", F.relu(_linear(theirs, enc + "linear1.", seq))))
    mlp = HEAD + "text_hidden_fcs.0."
    out = _linear(theirs, mlp + "2.", F.relu(_linear(theirs, mlp + "0.", seq)))
    return out[:, -1], out[:, :-1]


def authors_forward(theirs: dict, sam, hidden: torch.Tensor, image_mask: torch.Tensor, text_mask: torch.Tensor,
                    sam_embedding: torch.Tensor, *, heads: int, mlp: int, descriptor_heads: int,
                    kp_thresh: float = 0.4) -> dict:
    """One sample (batch 1, no padding) of their forward: heatmap, keypoints, low-res mask logits.

    ``sam`` is a ``segment_anything`` Sam whose prompt encoder (frozen, theirs too) encodes positions; its
    mask decoder is loaded with ``theirs``'s tensors (the IoU head stays SAM's own: they freeze it).
    """
    import copy

    head = authors_head(theirs, heads=heads, mlp=mlp)
    with torch.no_grad():
        out = head(inputs_embeds=hidden, attention_mask=torch.ones(hidden.shape[:2], dtype=torch.long),
                   position_ids=torch.arange(hidden.shape[1])[None], output_attentions=True)
    attn = out.attentions[0].mean(dim=1)[0]  # (L, L)
    last = int(text_mask[0].nonzero().max())
    row = attn[last][image_mask[0]]
    g = int(round(row.numel() ** 0.5))
    heatmap = (row / row.max()).clamp(1e-6, 1 - 1e-6).view(1, g, g)
    integer, _ = nms_keypoints(heatmap, max_points=16, radius=4.0, min_ratio=0.0)
    scores = heatmap.flatten(1).gather(1, (integer[..., 1] * g + integer[..., 0]).long())
    valid = scores > kp_thresh * heatmap.amax()  # their `k_scores > threshold`, threshold = ratio x peak
    points = subpixel_refine(heatmap, integer)
    points = torch.where(valid.unsqueeze(-1), points, integer)
    features = out.last_hidden_state[0]
    image = features[image_mask[0]].T.reshape(1, -1, g, g)
    start = features[last][None]
    glob, keys = authors_descriptor(theirs, image, start, points / (g - 1), ~valid, descriptor_heads)
    pe = sam.prompt_encoder.pe_layer._pe_encoding((points / (g - 1)).float())  # coords already in [0, 1]
    keys = keys + pe
    glob = glob + theirs[HEAD + "cls_token_pos"].float()[0]
    sparse = torch.cat((keys[valid], glob), dim=0)[None]
    decoder = copy.deepcopy(sam.mask_decoder)
    state = {k[len(DECODER):]: v.float() for k, v in theirs.items() if k.startswith(DECODER)}
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    assert all(m.startswith("iou_prediction_head.") for m in missing) and not unexpected, (missing, unexpected)
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *sam.prompt_encoder.image_embedding_size)
    with torch.no_grad():
        low_res, iou = decoder(image_embeddings=sam_embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return {"heatmap": heatmap[0], "points": points[0], "valid": valid[0], "low_res": low_res[0, 0]}


def authors_state_dict(cfg, sam, *, seed: int = 0) -> dict:
    """A random checkpoint with their key names and shapes for a LENS of ``cfg``'s sizes and ``sam``'s decoder."""
    g = torch.Generator().manual_seed(seed)
    d, mlp, c = cfg.hidden_size, cfg.mlp_size, cfg.prompt_dim
    rnd = lambda *shape, scale=0.05: torch.randn(*shape, generator=g) * scale
    state = {}
    for i in range(2):
        p = f"{HEAD}fusion_model.layers.{i}."
        for proj in "qkvo":
            state[p + f"self_attn.{proj}_proj.weight"] = rnd(d, d, scale=0.2)
        state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"] = rnd(mlp, d), rnd(mlp, d)
        state[p + "mlp.down_proj.weight"] = rnd(d, mlp)
        state[p + "input_layernorm.weight"] = 1 + rnd(d, scale=0.2)
        state[p + "post_attention_layernorm.weight"] = 1 + rnd(d, scale=0.2)
    state[HEAD + "fusion_model.norm.weight"] = 1 + rnd(d, scale=0.2)
    for name, module in (("feature_aggregator.", None), ("encoder_layer.layers.0.self_attn.", None)):
        state[HEAD + name + "in_proj_weight"], state[HEAD + name + "in_proj_bias"] = rnd(3 * d, d, scale=0.2), rnd(3 * d)
        state[HEAD + name + "out_proj.weight"], state[HEAD + name + "out_proj.bias"] = rnd(d, d, scale=0.2), rnd(d)
    ffn = cfg.descriptor_ffn
    for name, shape in (("ffn.0.", (ffn, d)), ("ffn.2.", (d, ffn)), ("encoder_layer.layers.0.linear1.", (2048, d)),
                        ("encoder_layer.layers.0.linear2.", (d, 2048)), ("text_hidden_fcs.0.0.", (d, d)),
                        ("text_hidden_fcs.0.2.", (c, d))):
        state[HEAD + name + "weight"], state[HEAD + name + "bias"] = rnd(*shape, scale=0.1), rnd(shape[0])
    for name in ("norm1.", "norm2.", "encoder_layer.layers.0.norm1.", "encoder_layer.layers.0.norm2."):
        state[HEAD + name + "weight"], state[HEAD + name + "bias"] = 1 + rnd(d, scale=0.2), rnd(d)
    state[HEAD + "cls_token_pos"] = torch.randn(1, 1, c, generator=g)
    for name, tensor in sam.mask_decoder.state_dict().items():
        if not name.startswith("iou_prediction_head."):
            state[DECODER + name] = tensor + rnd(*tensor.shape, scale=0.01) if tensor.is_floating_point() else tensor
    return state
