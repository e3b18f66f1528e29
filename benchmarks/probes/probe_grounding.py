"""Can the head learn grounding from a cache? Train the head alone on L_attn and watch the heatmap.

A diagnostic, not a benchmark of speed: it isolates layer 1's grounding map from SAM's mask
decoder (which dominates a full step's cost), so thousands of samples fit in a few CPU minutes.
Every ``--eval-every`` steps it prints, on the training store and on a held-out store:

- ``L_attn``: the attention BCE of the trained objective (lens_core.losses.attention_loss);
- ``iou24``: IoU of the map thresholded at 0.5 with the target on the 24x24 padded frame;
- ``peak_hit``: how often the map's peak cell lies on the target, against ``chance``
  (the mean target fraction of the frame: where a random peak would land).

    python benchmarks/probes/probe_grounding.py                # the demo's stores (make demo first)
    python benchmarks/probes/probe_grounding.py --no-detach-peak --heatmap-from mean --lr 1e-3

Defaults read ``work/demo-toy/stores/synthetic-{train,val}-L3`` (what ``make demo`` writes) with the toy preset.
"""

from __future__ import annotations

import json
import random
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import typer

from lens_cache.cli import command_app
from lens_core.geometry import mask_to_padded_frame
from lens_core.head import SegmentationHead
from lens_core.losses import attention_loss
from lens_train.training.data import QueryDataset, collate
from lens_train.training.presets import load_preset


def _frame_target(batch, k: int, grid: int) -> torch.Tensor:
    """(grid, grid) bool: query k's target on the padded frame."""
    size = tuple(int(v) for v in batch.input_sizes[k].tolist())
    return mask_to_padded_frame((batch.gts[k] == 1).float(), size, grid) > 0.5


@torch.no_grad()
def score(head: torch.nn.Module, items: list, grid: int, batch_size: int = 16) -> dict[str, float]:
    losses, ious, hits, fractions = [], [], [], []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        heatmap = head(batch.image_states.float(), batch.text_states.float(), batch.text_lengths).heatmap
        sizes = [tuple(int(v) for v in s) for s in batch.input_sizes.tolist()]
        losses.append(float(attention_loss(heatmap, batch.gts, sizes)) * len(batch))
        for k in range(len(batch)):
            target = _frame_target(batch, k, grid)
            pred = heatmap[k] > 0.5
            union = int((target | pred).sum())
            ious.append(int((target & pred).sum()) / union if union else 1.0)
            hits.append(bool(target.flatten()[heatmap[k].flatten().argmax()]))
            fractions.append(float(target.float().mean()))
    n = len(items)
    return {"L_attn": round(sum(losses) / n, 4), "iou24": round(sum(ious) / n, 4),
            "peak_hit": round(sum(hits) / n, 4), "chance": round(sum(fractions) / n, 4)}


class HeatmapFrom(str, Enum):
    """``--heatmap-from``: the start-of-answer token (last) or all text tokens (mean)."""

    last = "last"
    mean = "mean"


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.splitlines()[0])
def main(
    train: Annotated[str, typer.Option()] = "work/demo-toy/stores/synthetic-train-L3",
    val: Annotated[str, typer.Option()] = "work/demo-toy/stores/synthetic-val-L3",
    layer: Annotated[int, typer.Option()] = 3,
    preset_name: Annotated[str, typer.Option("--preset")] = "toy",
    heatmap_from: Annotated[HeatmapFrom | None, typer.Option()] = None,
    detach_peak: Annotated[bool | None, typer.Option(
        "--detach-peak/--no-detach-peak",
        help="divide by the detached peak (official; the preset's default) or not")] = None,
    lr: Annotated[float, typer.Option()] = 1e-3,
    steps: Annotated[int, typer.Option()] = 300,
    batch_size: Annotated[int, typer.Option()] = 8,
    eval_every: Annotated[int, typer.Option()] = 50,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (1 is fastest on 2 cores)")] = 1,
) -> None:
    """Train the head on L_attn alone; prints one JSON line per evaluation."""
    heatmap_from = heatmap_from.value if heatmap_from is not None else None  # the choice as a plain string
    for url in (train, val):
        if "://" not in url and not Path(url).is_dir():
            raise typer.BadParameter(f"no feature store at {url}: run `make demo` first (it writes the default stores) "
                                     "or pass --train/--val")
    torch.set_num_threads(threads)
    overrides = {k: v for k, v in (("heatmap_from", heatmap_from), ("detach_peak", detach_peak)) if v is not None}
    preset = load_preset(preset_name, model_overrides=overrides)
    torch.manual_seed(seed)  # the head is the first module build_lens makes: same init as lens-train's
    head = SegmentationHead(config=preset.model)
    grid = preset.model.grid_size
    train_set, val_set = QueryDataset(train, layer), QueryDataset(val, layer)
    train_items = [train_set[i] for i in range(len(train_set))]
    val_items = [val_set[i] for i in range(len(val_set))]
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    print(f"head only, L_attn only: heatmap_from={preset.model.heatmap_from} detach_peak={preset.model.detach_peak} "
          f"lr={lr} {steps} steps x {batch_size}; {len(train_items)} train / {len(val_items)} "
          "held-out queries", flush=True)
    start = time.perf_counter()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            row = {"step": step, "train": score(head, train_items, grid), "held_out": score(head, val_items, grid),
                   "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
        if step == steps:
            break
        batch = collate(rng.sample(train_items, min(batch_size, len(train_items))))
        heatmap = head(batch.image_states.float(), batch.text_states.float(), batch.text_lengths).heatmap
        sizes = [tuple(int(v) for v in s) for s in batch.input_sizes.tolist()]
        loss = attention_loss(heatmap, batch.gts, sizes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()


if __name__ == "__main__":
    app()
