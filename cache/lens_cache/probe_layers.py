"""``lens-cache probe-layers``: which decoder layer of the frozen MLLM already looks at the referent?

For every query of a split, one full forward of the image and the prompt a store build uses (the
adapter's own prompt and question rule) gives, per decoder layer, the last prompt token's attention
to the image tokens, averaged over heads, on the adapter's image grid (``grid_size``: 24 x 24 for
LLaVA-1.5 and Qwen2-VL here; :meth:`~lens_cache.backbones.mllm.MllmBackbone.image_attention_by_layer`).
Each map is scored against the query's target cells: the ground-truth mask brought into SAM's padded
frame at the grid's size and kept where it covers more than half a cell, the geometry of the head's
attention target (:func:`lens_core.geometry.mask_to_padded_frame`, as ``lens_core.losses.attention_loss``):

- **pointing game**: 1 if the map's peak cell is a target cell, else 0;
- **IoU** of the map thresholded at half its peak (``> 0.5 * peak``, as the evaluation's heatmap
  baseline) with the target cells;
- **chance**: the target's share of the grid's cells (where a random peak lands).

Decoder layer ``k`` (0-based) computes its attention from ``hidden_states[k]``: it is the layer a head
trained on ``--layers k`` features starts as (the warm start, ``lens_cache.warm_start.warm_start_layers``),
so the best-scoring ``k >= 1`` is the candidate for a preset's main layer. A query whose target covers
no cell by more than half, whose image cannot be read, or whose text the backbone refuses is skipped
and counted. No training: this reads the frozen MLLM only.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from lens_cache.errors import BadSampleError, UsageError

#: Files written into ``--out``.
JSON_NAME = "probe_layers.json"
CSV_NAME = "probe_layers.csv"
PLOT_NAME = "probe_layers.png"
#: How many layers the closing lines name.
TOP = 3


def target_cells(gt: np.ndarray | torch.Tensor, input_size: Sequence[int], grid: int) -> torch.Tensor:
    """(grid, grid) bool: the cells of SAM's padded frame the target covers by more than half.

    Args:
        gt: (H, W) uint8 label map at the original size (1 target, 0 background, 255 ignore).
        input_size: (h, w) of the image resized into SAM's 1024 frame.
    """
    from lens_core.geometry import mask_to_padded_frame

    target = torch.as_tensor(np.asarray(gt) == 1).float()
    return mask_to_padded_frame(target, tuple(int(v) for v in input_size), grid) > 0.5


def score_maps(maps: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing game and IoU of each layer's map against the target cells.

    Args:
        maps: (L, g, g) attention maps (any non-negative scale). target: (g, g) bool, not empty.
    Returns:
        ``(pointing, iou)``: (L,) float each; pointing is 1 where the map's peak cell (the first, on
        ties) is a target cell; IoU is that of the cells above half the map's peak with the target.
    """
    if maps.dim() != 3 or tuple(maps.shape[1:]) != tuple(target.shape):
        raise ValueError(
            f"maps must be (L, g, g) over a (g, g) target, got {tuple(maps.shape)} and {tuple(target.shape)}")
    flat = maps.reshape(maps.shape[0], -1).float()
    cells = target.reshape(-1).bool()
    pointing = cells[flat.argmax(1)].float()
    predicted = flat > 0.5 * flat.amax(1, keepdim=True)
    inter = (predicted & cells).sum(1).float()
    union = (predicted | cells).sum(1).float()
    return pointing, inter / union.clamp_min(1.0)


def chance_level(target: torch.Tensor) -> float:
    """The target's share of the grid's cells: a random peak's pointing game."""
    return float(target.float().mean())


def summarise(pointing: np.ndarray, iou: np.ndarray) -> list[dict]:
    """One row per layer: mean pointing game (+ its standard error), mean IoU, n.

    Args:
        pointing, iou: (N, L) per query and layer.
    """
    n = int(pointing.shape[0])
    rows = []
    for layer in range(pointing.shape[1]):
        hit = float(pointing[:, layer].mean())
        rows.append({
            "layer": layer,
            "pointing_game": round(hit, 4),
            "pointing_game_se": round(math.sqrt(hit * (1 - hit) / n), 4) if n > 1 else None,
            "iou": round(float(iou[:, layer].mean()), 4),
            "n": n,
        })
    return rows


def rank_layers(rows: Sequence[dict], key: str = "pointing_game") -> list[int]:
    """Layers best first by ``key`` (ties: the other score, then the lower layer)."""
    other = "iou" if key == "pointing_game" else "pointing_game"
    return [r["layer"] for r in sorted(rows, key=lambda r: (-r[key], -r[other], r["layer"]))]


def recommended_layer(rows: Sequence[dict]) -> int | None:
    """The best layer by pointing game (then IoU) that a store can cache: ``k >= 1`` (``hidden_states[0]``
    is the embeddings); None for a one-layer MLLM."""
    eligible = [r for r in rows if r["layer"] >= 1]
    return rank_layers(eligible)[0] if eligible else None


@dataclass
class ProbeResult:
    """What ``probe-layers`` measured.

    Attributes:
        rows: one per decoder layer (``summarise``).
        chance: mean over the scored queries of the target's share of the grid.
        grid_size, num_layers: the adapter's grid side and decoder depth.
        skipped: reason -> queries not scored.
        meta: split, MLLM, identity, elapsed time (written to the JSON file).
    """

    rows: list[dict]
    chance: float
    grid_size: int
    num_layers: int
    skipped: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def queries(self) -> int:
        return int(self.rows[0]["n"]) if self.rows else 0

    def best(self) -> dict:
        return {
            "by_pointing_game": rank_layers(self.rows, "pointing_game")[:TOP],
            "by_iou": rank_layers(self.rows, "iou")[:TOP],
            "recommended_layer": recommended_layer(self.rows),
        }

    def to_json(self) -> dict:
        return {
            **self.meta,
            "grid_size": self.grid_size,
            "num_layers": self.num_layers,
            "queries": self.queries,
            "skipped": dict(self.skipped),
            "chance": round(self.chance, 4),
            "layers": self.rows,
            "best": self.best(),
        }


def probe_layers(table: pa.Table, backbone: Any, *, progress: Any = None) -> ProbeResult:
    """Score every decoder layer's image attention on the queries of ``table`` (a manifest).

    Args:
        backbone: an MLLM adapter (``lens_cache.backbones.build_mllm``) with ``grid_size``,
            ``num_hidden_layers``, ``question_for`` and ``image_attention_by_layer``.
        progress: a :class:`~lens_cache.progress.Progress` advanced once per image, or None.
    Raises:
        UsageError: the adapter cannot give attention maps, or no query could be scored.
    """
    from lens_cache.backbones.geometry import sam_frame
    from lens_cache.block_job import load_image
    from lens_cache.store_plan import plan_images
    from lens_manifests import decode_target

    if not callable(getattr(backbone, "image_attention_by_layer", None)) or not hasattr(backbone, "grid_size"):
        raise UsageError(f"the MLLM adapter {type(backbone).__name__} gives no attention maps "
                         "(it needs grid_size and image_attention_by_layer)")
    grid, layers = int(backbone.grid_size), int(backbone.num_hidden_layers)
    plan = plan_images(table, block_size=1)
    columns = {name: table.column(name).to_pylist() for name in
               ("image_path", "height", "width", "text", "is_sentence", "mask_rle", "ignore_rle")}
    pointing, iou, chance = [], [], []
    skipped: Counter[str] = Counter()
    for image in range(plan.num_images):
        first, end = int(plan.first_query[image]), plan.query_end(image)
        size = (int(columns["height"][first]), int(columns["width"][first]))
        loaded = load_image(columns["image_path"][first], size)
        if loaded.image is None:
            skipped["image not usable"] += end - first
            if progress is not None:
                progress.message(
                    f"skipped {end - first} query(ies) of {columns['image_path'][first]}: {loaded.message}")
                progress.advance(1, end - first)
            continue
        frame = sam_frame(loaded.image)
        padded = frame.padded_image()
        for row in range(first, end):
            target = target_cells(decode_target({name: columns[name][row] for name in
                                                 ("mask_rle", "ignore_rle", "height", "width")}),
                                  frame.input_size, grid)
            if not target.any():
                skipped["target covers no grid cell by more than half"] += 1
                continue
            question = backbone.question_for(columns["text"][row], bool(columns["is_sentence"][row]))
            try:
                maps = backbone.image_attention_by_layer(padded, question)
            except BadSampleError:
                skipped["text refused by the backbone"] += 1
                continue
            if tuple(maps.shape) != (layers, grid, grid):
                raise RuntimeError(f"image_attention_by_layer gave {tuple(maps.shape)}, not {(layers, grid, grid)}")
            hit, overlap = score_maps(maps, target)
            pointing.append(hit.numpy())
            iou.append(overlap.numpy())
            chance.append(chance_level(target))
        if progress is not None:
            progress.advance(1, end - first)
    if not pointing:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "no queries"
        raise UsageError(f"no query could be scored ({reasons}): probe more images (--limit) or another split")
    return ProbeResult(
        rows=summarise(np.stack(pointing), np.stack(iou)),
        chance=float(np.mean(chance)),
        grid_size=grid,
        num_layers=layers,
        skipped=dict(skipped),
    )


# ----------------------------------------------------------------------------- output


def format_table(result: ProbeResult) -> str:
    """The per-layer table (plain text), the best layers and the recommendation."""
    lines = [f"{'layer':>5}  {'pointing game':>16}  {'IoU':>6}  {'n':>5}"]
    for r in result.rows:
        se = f" ± {r['pointing_game_se']:.3f}" if r["pointing_game_se"] is not None else ""
        lines.append(f"{r['layer']:>5}  {r['pointing_game']:>7.3f}{se:>9}  {r['iou']:>6.3f}  {r['n']:>5}")
    lines.append(f"chance (target cells / {result.grid_size}x{result.grid_size} cells): {result.chance:.3f}")
    if result.skipped:
        lines.append("skipped: " + ", ".join(f"{count} ({reason})" for reason, count in result.skipped.items()))
    return "\n".join(lines + closing_lines(result))


def closing_lines(result: ProbeResult) -> list[str]:
    """The best layers by each score, and which layer a preset should default to."""
    by = {r["layer"]: r for r in result.rows}
    best = result.best()

    def named(layers: list[int], key: str) -> str:
        return ", ".join(f"{k} ({by[k][key]:.3f})" for k in layers)

    lines = [f"best layers by pointing game: {named(best['by_pointing_game'], 'pointing_game')}",
             f"best layers by IoU: {named(best['by_iou'], 'iou')}"]
    k = best["recommended_layer"]
    if k is None:
        return lines
    lines.append(f"a preset's default layer should be {k} (--layers {k}: the head reads hidden_states[{k}] and "
                 f"starts as decoder layer {k}, whose attention this is)")
    if best["by_pointing_game"][0] == 0:
        lines.append("(decoder layer 0 reads the embeddings, hidden_states[0], which a store does not cache)")
    runner = [r for r in result.rows if r["layer"] not in (0, k)]
    se = by[k]["pointing_game_se"]
    if runner and se is not None:
        close = [r["layer"] for r in runner if by[k]["pointing_game"] - r["pointing_game"] <= se]
        if close:
            which = f"layers {', '.join(map(str, close))} lie" if len(close) > 1 else f"layer {close[0]} lies"
            lines.append(f"({which} within one standard error of it: probe more queries to separate them)")
    return lines


def write_outputs(result: ProbeResult, out: str | Path) -> list[Path]:
    """``probe_layers.json``, ``.csv`` and ``.png`` in ``out`` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, plot_path = out / JSON_NAME, out / CSV_NAME, out / PLOT_NAME
    json_path.write_text(json.dumps(result.to_json(), indent=2, sort_keys=False) + "\n")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["layer", "pointing_game", "pointing_game_se", "iou", "n", "chance"])
        writer.writeheader()
        for r in result.rows:
            writer.writerow({**r, "pointing_game_se": "" if r["pointing_game_se"] is None else r["pointing_game_se"],
                             "chance": round(result.chance, 4)})
    write_plot(result, plot_path)
    return [json_path, csv_path, plot_path]


def write_plot(result: ProbeResult, path: Path) -> None:
    """Pointing game (with its standard error) and IoU by layer, the chance level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in result.rows]
    hits = [r["pointing_game"] for r in result.rows]
    errors = [r["pointing_game_se"] or 0.0 for r in result.rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(layers) + 2), 3.6), dpi=110)
    ax.errorbar(layers, hits, yerr=errors, marker="o", ms=3, capsize=2, label="pointing game")
    ax.plot(layers, [r["iou"] for r in result.rows], marker="s", ms=3, label="IoU (> half peak)")
    ax.axhline(result.chance, color="grey", linestyle="--", linewidth=1, label=f"chance {result.chance:.3f}")
    k = result.best()["recommended_layer"]
    if k is not None:
        ax.axvline(k, color="tab:red", alpha=0.3, linewidth=4, label=f"recommended layer {k}")
    ax.set_xlabel("decoder layer (= --layers k it warm-starts)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    title = result.meta.get("mllm", "")
    ax.set_title(f"last token -> image attention, {title} on {result.meta.get('split', '')} (n={result.queries})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_probe(
    table: pa.Table,
    *,
    split: str,
    mllm: str,
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> tuple[ProbeResult, list[Path]]:
    """Build the MLLM ``mllm``, probe ``table``, write the outputs into ``out`` (the command's body)."""
    from lens_cache.backbones import build_mllm
    from lens_cache.backbones.runtime import cpu_threads, resolve_device
    from lens_cache.progress import Progress
    from lens_cache.store_plan import plan_images

    started = time.monotonic()
    dev = resolve_device(device)
    plan = plan_images(table, block_size=1)
    with cpu_threads(threads, dev):
        backbone = build_mllm(mllm, layers=(1,), device=dev)
        meter = Progress(total_images=plan.num_images, total_queries=plan.num_queries, enabled=progress,
                         label="lens-cache probe-layers")
        result = probe_layers(table, backbone, progress=meter)
        meter.close()
    result.meta = {
        "command": "lens-cache probe-layers",
        "split": split,
        "mllm": mllm,
        "identity": {k: v for k, v in backbone.identity.items() if k != "layers"},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    return result, write_outputs(result, out)
