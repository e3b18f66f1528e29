"""The toy SAM: ``segment_anything``'s real classes, pretrained SAM-style on toy scenes.

Architecture: :func:`lens_cache.backbones.toy.build_toy_sam` (loading the shipped toy SAM needs it, so it
lives with the backbones): a 3-block windowed ViT of width 64 on SAM's 1024 x 1024 input
and SAM's prompt encoder and two-way mask decoder at prompt width 64 instead of 256, so
its image embedding is (64, 64, 64).

Pretraining (:func:`pretrain_sam`) follows SAM's recipe at toy scale: each step draws
``images`` scenes, embeds them once, and decodes ``prompts`` prompts per image, sampled
from the instance masks: a single positive point (3 masks, loss on the best: SAM's
ambiguity rule), a box (one mask), or a point with a second positive point. Loss:
20 * focal + dice on the mask, MSE of the IoU head against the real IoU. Masks are
compared at the decoder's 256 x 256 low resolution (the padded frame / 4).

Held out (:func:`evaluate_sam`): single-point mIoU on scenes of the held-out stream,
one interior point per shape, the mask with the highest predicted IoU, compared at the
original image size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from lens_cache.backbones.toy import build_toy_sam
from lens_core.geometry import postprocess_masks

from .loop import Schedule, run_stage
from .world import HELD_OUT, TRAIN, ToyScene, draw_scene


# ----------------------------------------------------------------------------- prompts


def interior_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn pixel (x, y) of ``mask``, at its centre."""
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(xs)))
    return np.array([xs[k] + 0.5, ys[k] + 0.5])


def _prompts(scene: ToyScene, rng: np.random.Generator, count: int):
    """``count`` prompts of a scene: (kind, target index, frame coords) with kind in point/box/two."""
    out = []
    for _ in range(count):
        i = int(rng.integers(len(scene.shapes)))
        mask = scene.shapes[i].mask
        u = rng.random()
        if u < 0.5:
            out.append(("point", i, scene.to_frame(interior_point(mask, rng)[None])))
        elif u < 0.75:
            x, y, w, h = scene.shapes[i].bbox
            jitter = rng.normal(0, 0.05, size=4) * np.array([w, h, w, h])
            out.append(("box", i, scene.to_frame(np.array([x, y, x + w, y + h]) + jitter)))
        else:
            out.append(("two", i, scene.to_frame(np.stack([interior_point(mask, rng), interior_point(mask, rng)]))))
    return out


def decode(sam: Sam, embedding: torch.Tensor, kind: str, coords: torch.Tensor):
    """Decode a batch of prompts of one kind on one image's embedding (1, C, 64, 64).

    Returns (N, M, 256, 256) low-res logits and (N, M) IoU predictions; M is 3 for single
    points (SAM's multimask output), 1 otherwise.
    """
    if kind == "box":
        sparse, dense = sam.prompt_encoder(points=None, boxes=coords, masks=None)
    else:
        labels = torch.ones(coords.shape[:2], dtype=torch.int)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return sam.mask_decoder(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=kind == "point",
    )  # fmt: skip


# ----------------------------------------------------------------------------- losses


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels, per mask: (..., H, W) -> (...)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean((-2, -1))


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    inter = (p * target).sum((-2, -1))
    return 1 - (2 * inter + 1) / (p.sum((-2, -1)) + target.sum((-2, -1)) + 1)


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred & target).sum((-2, -1)).float()
    union = (pred | target).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's loss for (N, M, H, W) logits against (N, H, W) targets: min over the M masks of
    20 focal + dice, plus the IoU head's MSE on every mask. Returns (loss, best IoU (N,))."""
    target_m = target[:, None].expand_as(logits)
    per_mask = 20 * focal_loss(logits, target_m) + dice_loss(logits, target_m)
    best = per_mask.argmin(1)
    with torch.no_grad():
        ious = binary_iou(logits > 0, target_m > 0.5)
    mask_loss = per_mask.gather(1, best[:, None]).mean()
    iou_loss = F.mse_loss(iou_pred, ious)
    return mask_loss + iou_loss, ious.gather(1, best[:, None])[:, 0]


# ----------------------------------------------------------------------------- training


def pretrain_sam(
    work: Path, *, steps: int, images: int = 2, prompts: int = 8, lr: float = 1e-3, seed: int = 0,
    ckpt_every: int = 100, log=print,
) -> Sam:
    """Pretrain the toy SAM (resumable in ``work``); see the module docstring."""
    sam = build_toy_sam(seed)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        scenes = [draw_scene(TRAIN, step * images + j) for j in range(images)]
        pixels = torch.stack([sam.preprocess(s.frame.sam_pixels()) for s in scenes])
        embeddings = sam.image_encoder(pixels)
        losses, ious = [], []
        for b, scene in enumerate(scenes):
            rng = np.random.default_rng([seed, step, b])
            by_kind: dict[str, list] = {}
            for kind, i, xy in _prompts(scene, rng, prompts):
                by_kind.setdefault(kind, []).append((i, xy))
            for kind, items in by_kind.items():
                coords = torch.tensor(np.stack([xy.reshape(-1, 2) for _, xy in items]), dtype=torch.float32)
                if kind == "box":
                    coords = coords.reshape(-1, 4)
                target = (torch.stack([scene.low_res_mask(i) for i, _ in items]) > 0.5).float()
                logits, iou_pred = decode(sam, embeddings[b : b + 1], kind, coords)
                loss, iou = sam_loss(logits, iou_pred, target)
                losses.append(loss * len(items))
                ious.append(iou)
        total = sum(losses) / (images * prompts)
        return {"loss": total, "train_iou": torch.cat(ious).mean().detach()}

    run_stage("sam", sam, sam.parameters(), step_fn, Schedule(steps=steps, lr=lr), work, ckpt_every=ckpt_every, log=log)
    return sam.eval()


@torch.no_grad()
def evaluate_sam(sam: Sam, *, scenes: int = 40, start: int = 0) -> dict[str, float]:
    """Held-out single-point mIoU (one interior point per shape; the mask with the best predicted IoU)."""
    sam = sam.eval()
    ious = []
    for index in range(start, start + scenes):
        scene = draw_scene(HELD_OUT, index)
        rng = np.random.default_rng([HELD_OUT, index])
        embedding = sam.image_encoder(sam.preprocess(scene.frame.sam_pixels())[None])
        points = np.stack([scene.to_frame(interior_point(s.mask, rng)[None]) for s in scene.shapes])
        logits, iou_pred = decode(sam, embedding, "point", torch.tensor(points, dtype=torch.float32))
        chosen = logits[torch.arange(len(points)), iou_pred.argmax(1)][:, None]
        masks = postprocess_masks(chosen, scene.frame.input_size, scene.frame.original_size)[:, 0] > 0
        truth = torch.from_numpy(np.stack([s.mask for s in scene.shapes]))
        ious.append(binary_iou(masks, truth))
    all_ious = torch.cat(ious)
    return {"single_point_miou": float(all_ious.mean()), "masks": int(all_ious.numel()), "scenes": scenes}
