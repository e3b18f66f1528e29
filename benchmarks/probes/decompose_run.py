"""Where does a trained run lose? Grounding (heatmap, keypoints) against masks (descriptor, SAM decoder).

A diagnostic of a ``lens-train`` run on a feature store: for every query it records

- ``peak_hit``: the heatmap's peak cell lies on the target (>= half the cell covered, on the
  24 x 24 grid of SAM's padded frame);
- ``keypoints_on_target``: the share of the valid keypoints that lie on the target;
- the query's IoU (the mask that ``lens-eval`` scores);

and reports gIoU overall, given a peak hit and given a miss, and given that every keypoint
lies on the target: that last number is what the downstream half (descriptor + SAM's
decoder) achieves when grounding is right; the peak-hit rate is how often grounding is.

    python benchmarks/probes/decompose_run.py RUN_DIR STORE     # e.g. the demo's run and val store
    python benchmarks/probes/decompose_run.py work/demo-toy/runs/demo-lens work/demo-toy/stores/synthetic-val-L3
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from lens_cache.cli import command_app

#: A grid cell is on the target when the target covers at least this share of it.
CELL_ON_TARGET = 0.5


def target_cells(gt: torch.Tensor, input_size: tuple[int, int], grid: int) -> torch.Tensor:
    """(grid, grid) bool: cells of SAM's padded frame covered >= CELL_ON_TARGET by the target (gt == 1)."""
    from lens_core.geometry import mask_to_padded_frame

    low = mask_to_padded_frame((gt == 1).float(), input_size, grid * 8)
    return torch.nn.functional.avg_pool2d(low[None, None], 8)[0, 0] >= CELL_ON_TARGET


def query_record(heatmap: torch.Tensor, points: torch.Tensor, valid: torch.Tensor, cells: torch.Tensor) -> dict:
    """Peak hit and keypoint share for one query.

    Args:
        heatmap: (grid, grid). points: (K, 2) grid (x, y). valid: (K,) bool. cells: (grid, grid) bool.
    """
    grid = heatmap.shape[-1]
    peak = int(heatmap.flatten().argmax())
    chosen = points[valid]
    on = [bool(cells[min(max(int(round(float(y))), 0), grid - 1), min(max(int(round(float(x))), 0), grid - 1)])
          for x, y in chosen]
    return {"peak_hit": bool(cells.flatten()[peak]), "keypoints": len(on),
            "keypoints_on_target": float(np.mean(on)) if on else 0.0}


def summarize(records: list[dict]) -> dict:
    """gIoU overall and conditioned on grounding, from per-query records (``iou``, ``peak_hit``, ...)."""
    iou = np.array([r["iou"] for r in records])
    hit = np.array([r["peak_hit"] for r in records], dtype=bool)
    all_on = np.array([r["keypoints"] > 0 and r["keypoints_on_target"] == 1.0 for r in records], dtype=bool)

    def mean(mask: np.ndarray) -> float | None:
        return float(iou[mask].mean()) if mask.any() else None

    return {"queries": len(records), "giou": mean(np.ones_like(hit)), "peak_hit_rate": float(hit.mean()),
            "giou_given_peak_hit": mean(hit), "giou_given_peak_miss": mean(~hit),
            "all_keypoints_on_target_rate": float(all_on.mean()), "giou_given_all_keypoints_on_target": mean(all_on),
            "mean_valid_keypoints": float(np.mean([r["keypoints"] for r in records]))}


def decompose(run_dir: Path, store: str) -> dict:
    from torch.utils.data import DataLoader

    from lens_core.metrics import intersection_union, query_iou
    from lens_train.training.data import QueryDataset, collate
    from lens_train.evaluation.evaluate import predict
    from lens_train.training.loading import load_run

    run = load_run(run_dir)
    grid = run.model.config.grid_size
    loader = DataLoader(QueryDataset(store, run.config.layer), batch_size=8, collate_fn=collate)
    by_task: dict[str, list[dict]] = {}
    records: list[dict] = []
    for batch in loader:
        out, logits = predict(run.model, batch, precision=run.precision)
        for b in range(len(batch)):
            cells = target_cells(batch.gts[b], tuple(int(v) for v in batch.input_sizes[b]), grid)
            record = query_record(out.heatmap[b].float(), out.points[b].float(), out.valid[b], cells)
            pred = (torch.sigmoid(logits[b]) > run.threshold).numpy()
            record["iou"] = query_iou(*intersection_union(pred, batch.gts[b].numpy()))
            records.append(record)
            by_task.setdefault(batch.tasks[b], []).append(record)
    return {**summarize(records), "by_task": {task: summarize(rs) for task, rs in sorted(by_task.items())}}


app = command_app(context_settings={"help_option_names": ["-h", "--help"]})


@app.command(help=__doc__.split("\n")[0])
def main(
    run: Annotated[Path, typer.Argument(help="a lens-train run folder")],
    store: Annotated[str, typer.Argument(help="a feature store cached with the run's backbone (held out)")],
) -> None:
    """Decompose the run's gIoU on the store; prints the JSON object."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(decompose(run, store), indent=1))


if __name__ == "__main__":
    app()
