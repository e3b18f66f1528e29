"""The authors' LENS checkpoints and inputs (GitHub ``jiazhen-code/LENS``, commit 29c4959), read here.

Their ``train.py`` saves ``full_N.pth`` after epoch N: ``torch.save`` of a plain dict holding the
*trainable* tensors of their ``FullModel(net=Decoder, conditioner=MLLM_Conditioner)`` under its own
names. :data:`KEY_MAP` says where each goes in a :class:`lens_core.Lens` built with the ``official``
structure (``descriptor="official"``, ``final_norm=True``, ``train_iou_head=False``); the mapping is
strict both ways: every key of theirs is used exactly once and every trainable tensor of ours is filled,
with the same shape. :func:`convert_state_dict` is that mapping; :func:`lens_inputs_from_sequence`
turns their head's inputs (the whole layer-k sequence with its masks) into ``Lens.forward``'s, so the
two can be compared on the same numbers.

Only facts about their files are used here (key names, shapes, the order of the sequence); their code
is not copied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from lens_cache.errors import UsageError

#: their prefix -> ours (the first match wins; the rest of the key is kept).
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("conditioner.conditioning_module.fusion_model.layers.", "head.layers."),   # the 2 LlamaDecoderLayers
    ("conditioner.conditioning_module.fusion_model.norm.", "head.norm."),       # LlamaModel's final RMSNorm
    ("conditioner.conditioning_module.feature_aggregator.", "descriptor.cross_attn."),
    ("conditioner.conditioning_module.norm1.", "descriptor.cross_norm."),
    ("conditioner.conditioning_module.ffn.", "descriptor.ffn."),
    ("conditioner.conditioning_module.norm2.", "descriptor.ffn_norm."),
    ("conditioner.conditioning_module.encoder_layer.layers.0.", "descriptor.encoder."),
    ("conditioner.conditioning_module.text_hidden_fcs.0.", "descriptor.mlp."),
    ("conditioner.conditioning_module.cls_token_pos", "prompt_decoder.cls_position"),
    ("net.visual_model.mask_decoder.", "prompt_decoder.mask_decoder."),
)

#: What a Lens must be to take their weights (their structure), named as LensConfig fields.
REQUIRED_STRUCTURE = {"descriptor": "official", "final_norm": True, "train_iou_head": False}


def our_key(theirs: str) -> str | None:
    """Our parameter name for one of their checkpoint keys, or None if no rule covers it."""
    for prefix, ours in KEY_MAP:
        if theirs == prefix or (prefix.endswith(".") and theirs.startswith(prefix)):
            return ours + theirs[len(prefix):]
    return None


def convert_state_dict(theirs: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Their trainable tensors renamed to ``model``'s trainable parameters, strictly.

    Raises:
        UsageError: a key of theirs that no rule covers or that two keys would fill, a trainable
            parameter of ours left empty, or a shape that differs (a checkpoint of another backbone or
            SAM), in one line naming the first few.
    """
    config = getattr(model, "config", None)
    wrong = {k: getattr(config, k, None) for k, v in REQUIRED_STRUCTURE.items() if getattr(config, k, None) != v}
    if wrong:
        raise UsageError(f"the authors' checkpoints need the official structure ({REQUIRED_STRUCTURE}); this model "
                         f"has {wrong}: convert with --preset official (or a preset with those settings)")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    converted: dict[str, torch.Tensor] = {}
    unknown, twice = [], []
    for key, tensor in theirs.items():
        ours = our_key(key)
        if ours is None or ours not in params:
            unknown.append(key)
        elif ours in converted:
            twice.append(key)
        else:
            converted[ours] = tensor
    missing = sorted(set(params) - set(converted))
    if unknown or twice or missing:
        parts = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for what, keys in (("keys no rule maps", sorted(unknown)), ("keys mapped twice", twice),
                                    ("our trainable tensors left empty", missing)) if keys]
        raise UsageError("the checkpoint does not fit a LENS of this preset and SAM: " + "; ".join(parts))
    for name, tensor in converted.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise UsageError(f"the checkpoint's tensor for {name} is {tuple(tensor.shape)}, this model's is "
                             f"{tuple(params[name].shape)}: a checkpoint of another MLLM width or SAM")
    return converted


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """Their ``full_N.pth``: a dict of tensors, read with ``torch.load(weights_only=True)`` (never code).

    Raises:
        UsageError: missing, unreadable, or not a flat dict of tensors.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged or unsafe file
        first = " ".join(str(error).split())[:160]
        raise UsageError(f"{path} is not a readable torch checkpoint of tensors ({type(error).__name__}: {first}); "
                         "it must be a full_N.pth written by the authors' train.py") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UsageError(f"{path} does not hold a flat dict of tensors: it is not a full_N.pth of the authors' train.py")
    return dict(state)


def epoch_of(path) -> int | None:
    """N of ``full_N.pth`` (the epoch their train.py saved it after), else None."""
    match = re.fullmatch(r"full_(\d+)\.pth", str(path).rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


@dataclass
class LensInputs:
    """``Lens.forward``'s inputs cut from one sequence of the authors' head (see :func:`lens_inputs_from_sequence`)."""

    prefix_states: torch.Tensor  # (B, P, d)
    image_states: torch.Tensor  # (B, L_i, d)
    text_states: torch.Tensor  # (B, L_t, d), right-padded
    text_lengths: torch.Tensor  # (B,)


def lens_inputs_from_sequence(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_mask: torch.Tensor,
    text_token_mask: torch.Tensor,
) -> LensInputs:
    """Cut the authors' head input into ``Lens.forward``'s (their ``backbone.encode`` outputs).

    Their head reads the whole layer-k sequence ``hidden`` (B, L, d) with ``attention_mask`` (B, L: 1 =
    token, 0 = padding, on either side), ``image_token_mask`` (the image tokens) and ``text_token_mask``
    (the tokens after the last image token; its last one is the start-of-answer token). Ours reads the
    same tokens as three parts: the tokens before the first image token (the prefix), the image tokens,
    the text tokens. Each row must have the same prefix length and image-token count (one prompt
    template, one image each).

    Raises:
        UsageError: the masks do not describe such a sequence (one line).
    """
    if hidden.dim() != 3:
        raise UsageError(f"hidden must be (B, L, d), got {tuple(hidden.shape)}")
    batch, length, _ = hidden.shape
    for name, mask in (("attention_mask", attention_mask), ("image_token_mask", image_token_mask),
                       ("text_token_mask", text_token_mask)):
        if tuple(mask.shape) != (batch, length):
            raise UsageError(f"{name} must be (B={batch}, L={length}), got {tuple(mask.shape)}")
    valid = attention_mask.bool()
    image, text = image_token_mask.bool() & valid, text_token_mask.bool() & valid
    prefixes, images, texts = [], [], []
    for b in range(batch):
        where = image[b].nonzero().flatten()
        if where.numel() == 0 or not bool(text[b].any()):
            raise UsageError(f"row {b} has no image tokens or no text tokens after them")
        first, last = int(where[0]), int(where[-1])
        if where.numel() != last - first + 1:
            raise UsageError(f"row {b}: the image tokens are not one run")
        before = valid[b].clone()
        before[first:] = False
        prefixes.append(hidden[b][before])
        images.append(hidden[b, first : last + 1])
        texts.append(hidden[b][text[b]])
    if len({p.shape[0] for p in prefixes}) != 1 or len({i.shape[0] for i in images}) != 1:
        raise UsageError("rows differ in prefix length or image-token count: one prompt template and one image each")
    lengths = torch.tensor([t.shape[0] for t in texts])
    width = int(lengths.max())
    padded = hidden.new_zeros(batch, width, hidden.shape[-1])
    for b, t in enumerate(texts):
        padded[b, : t.shape[0]] = t
    return LensInputs(torch.stack(prefixes), torch.stack(images), padded, lengths)
