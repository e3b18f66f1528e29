"""The toy LLaVA: ``LlavaForConditionalGeneration`` pretrained in LLaVA's stages on toy scenes.

Architecture (:func:`toy_llava_config`): a CLIP vision tower at 336 px with 14 px patches
(24 x 24 = 576 image tokens, CLS dropped; width 64, 4 layers; its last layer feeds the
projector, ``vision_feature_layer=-1``), LLaVA-1.5's two-layer GELU projector and a
LLaMA of width 128 with 6 layers and 4 heads. The tokenizer is the tiny word-level one,
extended with the toy world's words (:func:`lens_toy.conversations.vocabulary_words`).

Stages, as LLaVA is built (each resumable, deterministic from its seed):

a. ``vision``: the vision tower alone, with linear read-outs of every patch's colour,
   shape kind (background included) and outline (which of its 4 x 4 sub-cells lie on a
   shape), and of each shape's kind from its patches pooled by coverage -- the stand-in for CLIP's pretraining: it teaches the tower what each patch
   and region shows, which CLIP learns from captions at scale.
b. ``align``: tower frozen; projector and LLaMA learn to caption scenes ("a big red
   circle, a small blue star."). Real LLaVA trains only the projector here because its
   LLaMA is pretrained; ours starts from scratch, so this stage is its text pretraining too.
c. ``instruct``: projector and LLaMA learn multi-turn conversations
   (:mod:`lens_toy.conversations`): attributes, yes/no, counts, relations and
   LLaVA-1.5's region grounding (boxes as text); only answer tokens are supervised, every
   answer with the same weight (:func:`answer_weights`: box answers are long). Unlike
   LLaVA-1.5 the tower is fine-tuned too, at a tenth of the lr: stage a's read-outs leave
   shape kinds weakly separated and the questions need them.

:func:`evaluate_llava` scores held-out scenes: exact answers by question type (teacher-
forced argmax over the whole answer, which equals greedy decoding's answer), box IoU of
generated grounding answers, and the pointing game of each layer's attention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from lens_cache.backbones.llava import REFERRING_QUESTION_TEMPLATE
from lens_cache.backbones.tiny_llava import build_tiny_processor, build_tiny_tokenizer
from lens_cache.backbones.toy import TOY_PROMPT_TEMPLATE

from .conversations import BOX_SYMBOLS, CAPTION_QUESTION, caption, grounding_phrases, parse_box, turns, vocabulary_words
from .loop import Schedule, run_stage, seeded
from .world import COLOUR_NAMES, HELD_OUT, KIND_NAMES, TRAIN, ToyScene, draw_scene

GRID = 24
OCCUPANCY_SUB = 4
NUM_IMAGE_TOKENS = GRID * GRID
SYSTEM, _, _ = TOY_PROMPT_TEMPLATE.partition("USER:")


def build_toy_processor() -> LlavaProcessor:
    return build_tiny_processor(build_tiny_tokenizer(vocabulary_words(), extra_symbols=BOX_SYMBOLS))


def toy_llava_config(processor: LlavaProcessor) -> LlavaConfig:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=4, num_attention_heads=4, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=NUM_IMAGE_TOKENS,
                       vision_feature_layer=-1, vision_feature_select_strategy="default")  # fmt: skip


def build_toy_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    processor = build_toy_processor()
    config = toy_llava_config(processor)
    model = seeded(seed, lambda: LlavaForConditionalGeneration(config))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


# ----------------------------------------------------------------------------- inputs


class Encoder:
    """Token ids, labels and pixels for the toy's training and evaluation."""

    def __init__(self, processor: LlavaProcessor) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.eos = self.tok.eos_token_id

    def words(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def pixels(self, scenes: list[ToyScene]) -> torch.Tensor:
        images = [s.frame.padded_image() for s in scenes]
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def conversation(self, pairs: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """LLaVA-1.5's template over several turns; labels are -100 except answers and their ``</s>``."""
        ids = [self.tok.bos_token_id, *self.words(SYSTEM)]
        labels = [-100] * len(ids)
        for turn, (question, answer) in enumerate(pairs):
            user = self.words("USER:") + ([self.image_id] * NUM_IMAGE_TOKENS if turn == 0 else []) + self.words(
                f"{question} ASSISTANT:")
            reply = [*self.words(answer), self.eos]
            ids += user + reply
            labels += [-100] * len(user) + reply
        return ids, labels

    def prompt(self, question: str) -> list[int]:
        """One-question prompt ending at ``ASSISTANT:`` (what generation and LENS see)."""
        ids, _ = self.conversation([(question, "")])
        return ids[:-1]  # drop the empty answer's </s>


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (i, lab) in enumerate(rows):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        attention[b, : len(i)] = 1
    return ids, labels, attention


def answer_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per-token weights that give every answer (each run of supervised tokens) the same total weight,
    normalised to sum to one over the batch; ``targets`` uses -100 for unsupervised positions."""
    supervised = targets != -100
    starts = supervised & ~F.pad(supervised[:, :-1], (1, 0), value=False)
    answer = torch.cumsum(starts.flatten(), 0).reshape(targets.shape)  # answer index, running over the batch
    counts = torch.bincount(answer[supervised])
    weights = torch.zeros(targets.shape, dtype=torch.float32)
    weights[supervised] = 1.0 / counts[answer[supervised]].float()
    return weights / max(1, int(starts.sum()))


def lm_loss(model: LlavaForConditionalGeneration, ids, labels, attention, pixels, *, per_answer: bool = False) -> torch.Tensor:
    """Next-token cross-entropy on the supervised tokens: their mean, or with ``per_answer`` the mean over
    answers of each answer's mean (a 21-token box answer then weighs what a one-word answer weighs)."""
    out = model(input_ids=ids, attention_mask=attention, pixel_values=pixels)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    if not per_answer:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none")
    return (ce * answer_weights(targets).reshape(-1)).sum()


# ----------------------------------------------------------------------------- stages


class VisionReadout(torch.nn.Module):
    """Linear colour and kind read-outs on the vision tower's patch features (stage a only)."""

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.tower = model.model.vision_tower
        width = model.config.vision_config.hidden_size
        self.colour = torch.nn.Linear(width, len(COLOUR_NAMES) + 1)
        self.kind = torch.nn.Linear(width, len(KIND_NAMES) + 1)
        self.region_kind = torch.nn.Linear(width, len(KIND_NAMES))
        self.occupancy = torch.nn.Linear(width, OCCUPANCY_SUB**2)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch colour and kind logits and the patch features (B, 576, width)."""
        features = self.tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]  # drop CLS
        return self.colour(features), self.kind(features), features


def _region_kinds(readout: VisionReadout, scenes: list[ToyScene], features: torch.Tensor):
    """Each shape's kind logits from its cells' features pooled by coverage, and the true kinds."""
    pooled, truth = [], []
    for b, s in enumerate(scenes):
        cover = s.cell_coverage(GRID)
        pooled.append(cover @ features[b] / cover.sum(1, keepdim=True).clamp(min=1e-6))
        truth += [KIND_NAMES.index(shape.kind) for shape in s.shapes]
    return readout.region_kind(torch.cat(pooled)), torch.tensor(truth)


def _labels(scenes: list[ToyScene]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [s.patch_labels(GRID) for s in scenes]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


#: First scene index of each stage in the TRAIN stream: the stages never share a scene.
STAGE_OFFSETS = {"vision": 10_000_000, "align": 20_000_000, "instruct": 30_000_000}


def pretrain_llava(
    work: Path, *, vision_steps: int = 3600, align_steps: int = 200, instruct_steps: int = 4200, batch: int = 8,
    seed: int = 0, log=print,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Run stages a-c (each resumed from ``work`` if interrupted); see the module docstring."""
    model, processor = build_toy_llava(seed)
    enc = Encoder(processor)
    readout = seeded(seed + 1, lambda: VisionReadout(model))

    def vision_step(step: int) -> dict[str, torch.Tensor]:
        scenes = [draw_scene(TRAIN, STAGE_OFFSETS["vision"] + step * 16 + j) for j in range(16)]
        colour, kind, features = readout(enc.pixels(scenes))
        colour_t, kind_t = _labels(scenes)
        loss = F.cross_entropy(colour.flatten(0, 1), colour_t.flatten()) + F.cross_entropy(kind.flatten(0, 1), kind_t.flatten())
        # the outline inside each patch at 4 x 4 sub-patch resolution: local geometry (edges, corners)
        occupancy_t = torch.stack([s.cell_occupancy(GRID, OCCUPANCY_SUB) for s in scenes])
        loss = loss + F.binary_cross_entropy_with_logits(readout.occupancy(features), occupancy_t)
        region, region_t = _region_kinds(readout, scenes, features)
        loss = loss + F.cross_entropy(region, region_t)
        fg = colour_t > 0
        return {"loss": loss, "colour_acc": (colour.argmax(-1) == colour_t)[fg].float().mean().detach(),
                "kind_acc": (kind.argmax(-1) == kind_t)[fg].float().mean().detach(),
                "region_kind_acc": (region.argmax(-1) == region_t).float().mean().detach()}

    run_stage("llava_a_vision", readout, readout.parameters(), vision_step,
              Schedule(steps=vision_steps, lr=2e-3, warmup=30), work, log=log)
    model.model.vision_tower.requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]

    def align_step(step: int) -> dict[str, torch.Tensor]:
        scenes = [draw_scene(TRAIN, STAGE_OFFSETS["align"] + step * batch + j) for j in range(batch)]
        rows = [enc.conversation([(CAPTION_QUESTION, caption(s))]) for s in scenes]
        ids, labels, attention = _batch(rows, enc.tok.pad_token_id)
        return {"loss": lm_loss(model, ids, labels, attention, enc.pixels(scenes))}

    model.model.vision_tower.eval()
    run_stage("llava_b_align", model, trainable, align_step, Schedule(steps=align_steps, lr=1e-3, warmup=30), work, log=log)

    def instruct_step(step: int) -> dict[str, torch.Tensor]:
        scenes = [draw_scene(TRAIN, STAGE_OFFSETS["instruct"] + step * batch + j) for j in range(batch)]
        rows = []
        for j, s in enumerate(scenes):
            rng = np.random.default_rng([seed, 3, step, j])
            rows.append(enc.conversation([(q, a) for _, q, a in turns(s, rng)][:10]))
        ids, labels, attention = _batch(rows, enc.tok.pad_token_id)
        return {"loss": lm_loss(model, ids, labels, attention, enc.pixels(scenes), per_answer=True)}

    # Instruction tuning also fine-tunes the vision tower, at a tenth of the lr: the questions
    # drive it to separate what stage a's read-outs could not (shape kinds, mostly).
    model.model.vision_tower.requires_grad_(True).train()
    groups = [{"params": trainable}, {"params": list(model.model.vision_tower.parameters()), "lr_scale": 0.1}]
    run_stage("llava_c_instruct", model, groups, instruct_step,
              Schedule(steps=instruct_steps, lr=1e-3, warmup=50), work, log=log)
    return model.eval(), processor


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_vision(work: Path, *, scenes: int = 32, seed: int = 0) -> dict:
    """Held-out accuracy of stage a's read-outs (from its checkpoint in ``work``): per-patch colour and kind
    on shape patches, and each shape's kind from its pooled patches."""
    model, processor = build_toy_llava(seed)
    readout = VisionReadout(model)
    readout.load_state_dict(torch.load(work / "llava_a_vision.ckpt", map_location="cpu", weights_only=True)["model"])
    readout.eval()
    enc = Encoder(processor)
    held = [draw_scene(HELD_OUT, 100_000 + i) for i in range(scenes)]
    colour, kind, features = readout(enc.pixels(held))
    colour_t, kind_t = _labels(held)
    fg = colour_t > 0
    region, region_t = _region_kinds(readout, held, features)
    return {"patch_colour_acc": float((colour.argmax(-1) == colour_t)[fg].float().mean()),
            "patch_kind_acc": float((kind.argmax(-1) == kind_t)[fg].float().mean()),
            "region_kind_acc": float((region.argmax(-1) == region_t).float().mean()), "scenes": scenes}


@torch.no_grad()
def evaluate_llava(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, *, scenes: int = 30, start: int = 0,
    boxes: bool = True,
) -> dict:
    """Held-out scores (see the module docstring): accuracy by question type, box IoU, pointing game."""
    model = model.eval()
    model.set_attn_implementation("eager")  # attention weights for the pointing game
    enc = Encoder(processor)
    correct: dict[str, list[float]] = {}
    box_ious: list[float] = []
    pointing: list[list[float]] = []
    for index in range(start, start + scenes):
        scene = draw_scene(HELD_OUT, index)
        pixels = enc.pixels([scene])
        rng = np.random.default_rng([HELD_OUT, 7, index])
        for kind, question, answer in turns(scene, rng):
            if kind == "box":
                if boxes and len(box_ious) < 2 * scenes:
                    ids = torch.tensor([enc.prompt(question)])
                    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=24, do_sample=False)
                    got = parse_box(processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
                    box_ious.append(_box_iou(got, parse_box(answer)))
                continue
            ids, labels = enc.conversation([(question, answer)])
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, :-1]
            target = torch.tensor(labels[1:])
            sel = target != -100
            correct.setdefault(kind, []).append(float((logits[sel].argmax(-1) == target[sel]).all()))
        pointing.extend(pointing_game(model, enc, scene, pixels))
    out = {f"acc_{k}": float(np.mean(v)) for k, v in sorted(correct.items())}
    out["n_by_type"] = {k: len(v) for k, v in sorted(correct.items())}
    if box_ious:
        out["box_iou_mean"] = float(np.mean(box_ious))
        out["box_iou_gt_0.5"] = float(np.mean([v > 0.5 for v in box_ious]))
    hits = np.asarray(pointing)  # (scenes x queries, layers + 1)
    out["pointing_game_by_layer"] = [round(float(v), 3) for v in hits[:, :-1].mean(0)]
    out["pointing_game_chance"] = round(float(hits[:, -1].mean()), 3)
    out["scenes"] = scenes
    return out


def _box_iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def pointing_game(model, enc: Encoder, scene: ToyScene, pixels: torch.Tensor) -> list[list[float]]:
    """For each single-target REFER phrase of the scene asked with LENS's question: per layer, 1 if the
    last prompt token's attention (mean over heads) peaks on a grid cell inside the target, and chance
    (the target's share of the image's cells) last."""
    rows = []
    seen = set()
    for phrase, i in grounding_phrases(scene):
        if i in seen:
            continue
        seen.add(i)
        ids = torch.tensor([enc.prompt(REFERRING_QUESTION_TEMPLATE.format(text=phrase.removeprefix("the ")))])
        out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
        start = int((ids[0] == enc.image_id).nonzero()[0])
        inside = scene.low_res_mask(i, GRID * 8)
        cell = torch.nn.functional.avg_pool2d(inside[None, None], 8)[0, 0].flatten() >= 0.5
        if not cell.any():
            continue
        row = []
        for attn in out.attentions:
            image_attn = attn[0, :, -1, start : start + NUM_IMAGE_TOKENS].mean(0)
            row.append(float(cell[int(image_attn.argmax())]))
        h, w = scene.frame.input_size
        valid = (h / 1024) * (w / 1024) * NUM_IMAGE_TOKENS
        row.append(float(cell.sum()) / valid)
        rows.append(row)
    return rows
