"""`make demo-core`: the LENS core alone, trained on a planted task of synthetic tensors.

A quick sanity check of the model; the whole pipeline is `make demo`
(:mod:`lens_train.reproduction.reproduce`). No MLLM and no cache: each sample's "image-token
states" carry a hidden direction inside a random rectangle of the 24x24 grid, the
question's start-of-answer token carries the same direction, and SAM's embedding
carries a matching signal. LENS (tiny preset, tiny SAM built with the real classes)
must learn to put its heatmap, keypoints and mask on the rectangle. It writes a figure
(heatmap + keypoints + masks), the training curve and gIoU/cIoU before and after training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

from lens_cache.backbones.sam import build_sam
from lens_cache.cli import command_app
from lens_core import build_lens
from lens_core.losses import attention_loss, segmentation_loss
from lens_core.metrics import giou_ciou

from ..training.presets import load_preset

IMAGE_SIZE = 256  # original size of the planted "images" (square, so input_size is 1024x1024)


def planted_batch(batch: int, dim: int, generator: torch.Generator):
    """(image_states, text_states, text_lengths, sam_embeddings, masks) of the planted task."""
    direction = F.normalize(torch.randn(dim, generator=generator), dim=0) * 4
    images, texts, sams, masks = [], [], [], []
    for _ in range(batch):
        x0, y0 = torch.randint(0, 16, (2,), generator=generator).tolist()
        w, h = torch.randint(4, 9, (2,), generator=generator).tolist()
        grid = torch.zeros(24, 24)
        grid[y0 : y0 + h, x0 : x0 + w] = 1
        tokens = torch.randn(576, dim, generator=generator) + grid.view(-1, 1) * direction
        text = torch.randn(6, dim, generator=generator)
        text[-1] += direction
        sam = torch.randn(256, 64, 64, generator=generator) * 0.5
        sam[:32] += F.interpolate(grid[None, None], (64, 64), mode="nearest")[0, 0] * 2
        mask = F.interpolate(grid[None, None], (IMAGE_SIZE, IMAGE_SIZE), mode="nearest")[0, 0].to(torch.uint8)
        images.append(tokens), texts.append(text), sams.append(sam), masks.append(mask)
    return torch.stack(images), torch.stack(texts), torch.full((batch,), 6), torch.stack(sams), masks


def evaluate(lens, data, threshold_logit: float = 0.0):
    image, text, lengths, sam, masks = data
    lens.eval()
    with torch.no_grad():
        out = lens(image, text, lengths, sam)
    sizes = torch.tensor([[1024, 1024]] * len(masks))
    orig = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * len(masks))
    logits = lens.masks_at_original_size(out.low_res_logits, sizes, orig)
    preds = [(lg > threshold_logit).numpy() for lg in logits]
    return giou_ciou(preds, [m.numpy() for m in masks]), out, preds


app = command_app()


@app.command(help=__doc__.splitlines()[0])
def main(
    out: Annotated[str, typer.Option(help="output folder")] = "demo",
    steps: Annotated[int, typer.Option(help="training steps")] = 40,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    preset = load_preset("tiny")
    torch.manual_seed(seed)
    lens = build_lens(preset.model, build_sam("tiny"))
    opt = torch.optim.AdamW(lens.trainable_parameters(), lr=preset.train.lr, betas=preset.train.betas)
    eval_data = planted_batch(16, preset.model.hidden_size, torch.Generator().manual_seed(10_000 + seed))
    (g0, c0), _, _ = evaluate(lens, eval_data)
    print(f"untrained: gIoU {g0:.3f} cIoU {c0:.3f}")

    gen = torch.Generator().manual_seed(seed)
    curve = []
    start = time.time()
    for step in range(1, steps + 1):
        lens.train()
        image, text, lengths, sam, masks = planted_batch(4, preset.model.hidden_size, gen)
        out = lens(image, text, lengths, sam, generator=gen)
        sizes = torch.tensor([[1024, 1024]] * 4)
        logits = lens.masks_at_original_size(out.low_res_logits, sizes, torch.tensor([[IMAGE_SIZE] * 2] * 4))
        seg = segmentation_loss(logits, masks, dice_weight=preset.train.dice_weight, bce_weight=preset.train.bce_weight)
        attn = attention_loss(out.heatmap, masks, [(1024, 1024)] * 4, size=preset.train.attn_size)
        loss = seg["seg"] + preset.train.attn_weight * attn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lens.trainable_parameters(), preset.train.grad_clip)
        opt.step()
        curve.append({"step": step, "loss": loss.item(), "seg": seg["seg"].item(), "attn": attn.item()})
        if step % 10 == 0 or step == steps:
            rate = step / (time.time() - start)
            eta = (steps - step) / rate
            print(f"step {step}/{steps} loss {loss.item():.3f} (seg {seg['seg'].item():.3f}, attn {attn.item():.3f})"
                  f" {rate:.2f} steps/s ETA {eta:.0f}s", flush=True)

    (g1, c1), out, preds = evaluate(lens, eval_data)
    print(f"trained:   gIoU {g1:.3f} cIoU {c1:.3f}")
    metrics = {"untrained": {"giou": g0, "ciou": c0}, "trained": {"giou": g1, "ciou": c1}, "steps": steps,
               "note": "planted task on synthetic tensors, no cache and no MLLM: a check of the LENS core alone (the full pipeline is make demo)"}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out_dir / "curve.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in curve)
    write_figures(out_dir, curve, out, preds, eval_data[4])
    print(f"wrote {out_dir}/metrics.json, {out_dir}/curve.png, {out_dir}/overlays.png")


def write_figures(out_dir: Path, curve, out, preds, masks, rows: int = 4) -> None:
    import matplotlib  # only when figures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], label="total")
    ax.plot([r["step"] for r in curve], [r["attn"] for r in curve], label="L_attn")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows))
    for r in range(rows):
        heat = out.heatmap[r].numpy()
        axes[r, 0].imshow(heat, cmap="jet", extent=(-0.5, 23.5, 23.5, -0.5))
        pts, valid = out.points[r].numpy(), out.valid[r].numpy()
        axes[r, 0].scatter(pts[valid, 0], pts[valid, 1], c="white", s=14, edgecolors="black")
        axes[r, 0].scatter(pts[~valid & (pts.sum(1) > 0), 0], pts[~valid & (pts.sum(1) > 0), 1], c="red", s=10)
        axes[r, 1].imshow(preds[r], cmap="gray")
        axes[r, 2].imshow(masks[r].numpy(), cmap="gray")
        for c, title in enumerate(("heatmap + keypoints", "predicted mask", "ground truth")):
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "overlays.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    app()
