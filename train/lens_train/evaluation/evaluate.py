"""``lens-eval``: gIoU / cIoU of a trained run on a feature store, per query and per subset.

The model is rebuilt from the run's ``config.json`` (preset, LensConfig, SAM spec) and
its ``model.safetensors``; the store must have been cached with the run's backbone
identity. A query's prediction is ``sigmoid(logit) > threshold`` at the image's
original size (SAM's post-processing); metrics follow LISA (``lens_core.metrics``).

Two trivial baselines are scored on the same queries, so a number never stands alone:
``whole_image`` (every pixel is the target) and ``heatmap`` (the model's own grounding
heatmap, upsampled to the image and thresholded at half its peak, no SAM). A model
that has learned anything beats both.

Outputs (``--out``, default ``RUN_DIR/eval-<store name>``)::

    metrics.json        giou, ciou, num_queries, short/long subsets (is_sentence), threshold, ...
    per_query.parquet   query_id, dataset, task, is_sentence, inter, union, iou (+ baselines' IoU)
    overlays.png        image | heatmap + keypoints | prediction | ground truth (paper Fig. 3)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset

from lens_cache.backbones.runtime import resolve_device
from lens_cache.identity import feature_differences, format_differences
from lens_cache.images import ImageReadError, read_rgb
from lens_core import Lens, LensOutput
from lens_core.files import replaced_on_success, write_text_atomically
from lens_core.metrics import giou_ciou_from_counts, intersection_union, query_iou

from ..training.data import Batch, QueryDataset, collate
from ..errors import UserError
from ..figures import OverlayItem, heatmap_on_image, write_overlays
from ..training.run_config import RunConfig
from ..training.stores import refuse_output_in_a_store, require_prefix
from ..training.precision import autocast_for
from ..training.loading import load_run

if TYPE_CHECKING:
    from lens_cache.store import FeatureStore


#: Trivial predictors scored beside the model (see the module docstring).
BASELINES = ("whole_image", "heatmap")
#: The heatmap baseline's level: the heatmap is peak-normalised, so this is half its peak.
HEATMAP_BASELINE_LEVEL = 0.5


@torch.no_grad()
def predict(model: Lens, batch: Batch, *, precision: str = "fp32") -> tuple[LensOutput, list[torch.Tensor]]:
    """Model output and the mask logits (float32) at each image's original size, for a batch on the model's device."""
    device = batch.image_states.device
    with autocast_for(device, precision):
        out = model(batch.image_states, batch.text_states, batch.text_lengths, batch.sam_embeddings,
                    prefix_states=batch.prefix_states)
    logits = model.masks_at_original_size(out.low_res_logits.float(), batch.input_sizes, batch.original_sizes)
    return out, logits


def summarize(inters: Sequence[int], unions: Sequence[int]) -> dict[str, Any]:
    """``{"giou", "ciou", "num_queries"}`` of (N,) per-query counts (``lens_core.metrics``); None for N = 0."""
    if len(inters) == 0:
        return {"giou": None, "ciou": None, "num_queries": 0}
    giou, ciou = giou_ciou_from_counts(inters, unions)
    return {"giou": giou, "ciou": ciou, "num_queries": len(inters)}


def default_out_dir(run_dir: Path, store_url: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(store_url.rstrip("/")).name) or "store"
    return Path(run_dir) / f"eval-{name}"


def _load_image(path: str) -> np.ndarray | None:
    """(H, W, 3) uint8 of the image at ``path`` for the figures, read as the cache read it; None if it cannot be."""
    try:
        return np.asarray(read_rgb(path))
    except ImageReadError:
        return None


def evaluate(
    run_dir: Path,
    cache: str,
    *,
    threshold: float | None = None,
    out: Path | None = None,
    limit: int | None = None,
    figures: int = 8,
    device: str | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    sam: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the run (or model folder, :func:`load_run`) ``run_dir`` on the store ``cache``; write and return
    the metrics (default ``--out``: ``RUN_DIR/eval-<store>``; for a model folder ``./eval-<folder>/eval-<store>``).

    The store's readers' lock is held meanwhile (``lens_cache.locks.reading``): a rebuild or repair of it
    is refused until the evaluation ends.

    Raises:
        StoreError / UserError: the store is not the run's backbone, or a bad option.
    """
    from lens_cache.locks import reading

    with reading(cache):
        return _evaluate(run_dir, cache, threshold=threshold, out=out, limit=limit, figures=figures, device=device,
                         batch_size=batch_size, num_workers=num_workers, sam=sam, log=log)


def _evaluate(
    run_dir: Path,
    cache: str,
    *,
    threshold: float | None = None,
    out: Path | None = None,
    limit: int | None = None,
    figures: int = 8,
    device: str | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    sam: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` without the store's lock."""
    from lens_cache.store import FeatureStore  # zarr: loaded only when a store is read

    from ..training.model_folder import open_trained

    say = log or (lambda line: print(line, flush=True))
    checkpoint = open_trained(run_dir)  # a run folder, a model folder, toy or a Hub id
    config = checkpoint.config
    store = FeatureStore.open(cache)
    _require_run_store(store, config, run_dir=run_dir, cache=cache)
    # a model folder is an artifact (shipped, downloaded, pushed): its evaluations go to the current folder
    out_dir = Path(out) if out is not None else default_out_dir(
        checkpoint.path if checkpoint.kind == "run" else Path(f"eval-{checkpoint.path.name}"), cache)
    refuse_output_in_a_store(out_dir)
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise UserError(f"--threshold is a probability in (0, 1), got {threshold}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")

    dev = resolve_device(device)
    run = load_run(checkpoint, device=dev, sam=sam)
    threshold = run.threshold if threshold is None else threshold
    dataset = QueryDataset(cache, config.layer, store=store)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    subset = Subset(dataset, range(count))
    figure_rows = set(np.linspace(0, count - 1, num=min(figures, count)).round().astype(int).tolist()) if figures else set()
    loader = DataLoader(subset, batch_sampler=BatchSampler(SequentialSampler(subset), batch_size, drop_last=False),
                        collate_fn=collate, num_workers=num_workers, pin_memory=dev.type == "cuda")
    manifest = store.manifest
    scores = _Scores(texts=manifest.column("text").to_pylist(), paths=manifest.column("image_path").to_pylist())
    position = 0
    for batch in _progress(loader, count, batch_size, say):
        batch = batch.to(dev)
        output, logits = predict(run.model, batch, precision=run.precision)
        for b, logit in enumerate(logits):
            scores.add(output, batch, b, logit, threshold=threshold, figure=position in figure_rows)
            position += 1

    metrics = {
        **scores.metrics(),
        "threshold": threshold,
        "run": str(run_dir),
        "step": run.step,
        "store": store.url,
        "identity_hash": store.identity_hash,
        "skipped_queries": store.num_queries - len(dataset),
        "limit": limit,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    scores.write(out_dir, metrics, grid_size=run.model.config.grid_size)
    whole, heat = metrics["baselines"]["whole_image"], metrics["baselines"]["heatmap"]
    say(f"gIoU {metrics['giou']:.4f} cIoU {metrics['ciou']:.4f} on {metrics['num_queries']} queries "
        f"(short {_fmt(metrics['short'])}, long {_fmt(metrics['long'])}); baselines gIoU: whole image "
        f"{whole['giou']:.4f}, heatmap alone {heat['giou']:.4f}; wrote {out_dir}")
    return metrics


def _require_run_store(store: FeatureStore, config: RunConfig, *, run_dir: Path, cache: str) -> None:
    """Refuse a store whose features are not the run's: another backbone, no run layer, another prefix.

    The rule training applies to mixed stores: the layer set a store keeps does not change its
    features (a run trained on a (14, 30) store evaluates on a (14,) store), the run's layer must be there.
    """
    from lens_cache.store import require_layer

    diffs = feature_differences(config.stores[0].identity, store.identity)
    if diffs:
        raise UserError(f"store {cache} was cached with another backbone than run {run_dir} was trained on "
                        f"({format_differences(diffs, ('run', 'store'))})")
    require_layer(store.layers, config.layer, holder=f"store {cache}",
                  fix=f"run {run_dir} was trained on layer {config.layer}: evaluate it on a store that caches it")
    require_prefix(store, layer=config.layer, config=config.model)


@dataclass
class _Scores:
    """What an evaluation gathers query by query: the per-query table, the baselines' counts, the overlays.

    ``texts`` and ``paths`` are the store manifest's columns (by query id), for the overlays' titles and images.
    """

    texts: list[str]
    paths: list[str]
    records: dict[str, list] = field(default_factory=lambda: {
        k: [] for k in ("query_id", "dataset", "task", "is_sentence", "inter", "union", "iou")})
    baselines: dict[str, dict[str, list[int]]] = field(default_factory=lambda: {
        name: {"inter": [], "union": []} for name in BASELINES})
    items: list[OverlayItem] = field(default_factory=list)

    def add(self, output: LensOutput, batch: Batch, b: int, logit: torch.Tensor, *, threshold: float,
            figure: bool) -> None:
        """Score query ``b`` of ``batch`` (its mask logits at the original size: ``logit``) and the baselines on it;
        keep its overlay when ``figure``."""
        pred = (torch.sigmoid(logit) > threshold).cpu().numpy()
        gt = batch.gts[b].cpu().numpy()
        inter, union = intersection_union(pred, gt)
        query_id = int(batch.query_ids[b])
        records = self.records
        records["query_id"].append(query_id)
        records["dataset"].append(batch.datasets[b])
        records["task"].append(batch.tasks[b])
        records["is_sentence"].append(bool(batch.is_sentence[b]))
        records["inter"].append(inter)
        records["union"].append(union)
        records["iou"].append(query_iou(inter, union))
        heat = heatmap_on_image(output.heatmap[b].float().cpu(), batch.input_sizes[b].tolist(),
                                batch.original_sizes[b].tolist())
        for name, baseline in (("whole_image", np.ones_like(pred)), ("heatmap", heat > HEATMAP_BASELINE_LEVEL)):
            b_inter, b_union = intersection_union(baseline, gt)
            self.baselines[name]["inter"].append(b_inter)
            self.baselines[name]["union"].append(b_union)
        if figure:
            self.items.append(OverlayItem(
                image=_load_image(self.paths[query_id]), heatmap=output.heatmap[b].float().cpu(),
                points=output.points[b].cpu(), valid=output.valid[b].cpu(), used=output.used[b].cpu(), pred=pred, gt=gt,
                input_size=tuple(int(v) for v in batch.input_sizes[b]),
                original_size=tuple(int(v) for v in batch.original_sizes[b]),
                title=self.texts[query_id], iou=records["iou"][-1]))

    def metrics(self) -> dict[str, Any]:
        """gIoU / cIoU overall, of the short and long (``is_sentence``) queries, and of each baseline."""
        sentence = np.asarray(self.records["is_sentence"], dtype=bool)
        inters = np.asarray(self.records["inter"], dtype=np.int64)
        unions = np.asarray(self.records["union"], dtype=np.int64)
        return {
            **summarize(inters, unions),
            "short": summarize(inters[~sentence], unions[~sentence]),
            "long": summarize(inters[sentence], unions[sentence]),
            "baselines": {name: summarize(v["inter"], v["union"]) for name, v in self.baselines.items()},
        }

    def write(self, out_dir: Path, metrics: dict[str, Any], *, grid_size: int) -> None:
        """per_query.parquet (with the baselines' IoU), metrics.json and overlays.png in ``out_dir``."""
        for name, values in self.baselines.items():
            self.records[f"iou_{name}"] = [query_iou(i, u) for i, u in zip(values["inter"], values["union"])]
        _write_parquet(out_dir / "per_query.parquet", self.records)
        write_text_atomically(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_overlays(out_dir / "overlays.png", self.items, grid_size=grid_size)


def _fmt(subset: dict[str, Any]) -> str:
    if not subset["num_queries"]:
        return "none"
    return f"{subset['giou']:.3f}/{subset['ciou']:.3f} on {subset['num_queries']}"


def _write_parquet(path: Path, records: dict[str, list]) -> None:
    import pyarrow as pa  # loaded only when a table is written
    import pyarrow.parquet as pq

    table = pa.table({
        "query_id": pa.array(records["query_id"], pa.int64()),
        "dataset": pa.array(records["dataset"], pa.string()),
        "task": pa.array(records["task"], pa.string()),
        "is_sentence": pa.array(records["is_sentence"], pa.bool_()),
        "inter": pa.array(records["inter"], pa.int64()),
        "union": pa.array(records["union"], pa.int64()),
        "iou": pa.array(records["iou"], pa.float64()),
        **{f"iou_{name}": pa.array(records[f"iou_{name}"], pa.float64()) for name in BASELINES},
    })
    with replaced_on_success(path) as tmp:
        pq.write_table(table, tmp)


def _progress(loader: DataLoader, count: int, batch_size: int, say: Callable[[str], None]) -> Iterator[Batch]:
    started, every = time.perf_counter(), max(1, (count // batch_size) // 10)
    for i, batch in enumerate(loader):
        yield batch
        if (i + 1) % every == 0:
            done = min(count, (i + 1) * batch_size)
            rate = done / max(time.perf_counter() - started, 1e-9)
            say(f"eval {done}/{count} queries ({rate:.1f}/s)")
