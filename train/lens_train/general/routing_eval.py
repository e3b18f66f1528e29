"""One routing run: read the benchmark, route every sample with the agent's router, score, write.

Outputs in ``--out``: ``routing_predictions.parquet`` (or ``.jsonl`` with ``--format
jsonl``: id, tier, raw_tier, query, image, should_trigger, triggered, correct, intent,
decided_by, router_answer) and ``routing_metrics.json`` (the metrics of
:func:`lens_train.general.routing.routing_metrics`, how many decisions the MLLM made
itself, and what was skipped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lens_cache.errors import UserError as AnyUserError  # image errors are stage 1's UserError

from ..errors import UserError
from ..inference.segmenter import load_image
from .answer import load_mllm
from .outputs import out_folder, write_json, write_table
from .router import decide, router_agent
from .routing import RoutingSet, parse_tier_map, read_routing, routing_metrics

PREDICTION_COLUMNS = ("id", "tier", "raw_tier", "query", "image", "should_trigger", "triggered", "correct",
                      "intent", "decided_by", "router_answer")
METRICS_FILE = "routing_metrics.json"
LISTED = 20

Say = Callable[[str], None]


def route_all(routing_set: RoutingSet, agent: Any, *, say: Say | None = None) -> list[dict]:
    """One prediction record per sample (see :data:`PREDICTION_COLUMNS`); a sample whose image
    cannot be decoded is skipped and its id added to ``routing_set.unreadable_images``."""
    records = []
    for done, sample in enumerate(routing_set.samples, start=1):
        try:
            image = load_image(sample.image) if sample.image is not None else None
        except AnyUserError:
            routing_set.unreadable_images.append(sample.id)
            continue
        decision = decide(agent, sample.query, image)
        records.append({
            "id": sample.id,
            "tier": sample.tier,
            "raw_tier": sample.raw_tier,
            "query": sample.query,
            "image": str(sample.image.relative_to(routing_set.image_root)) if sample.image is not None else None,
            "should_trigger": sample.should_trigger,
            "triggered": decision.triggered,
            "correct": decision.triggered == sample.should_trigger,
            "intent": decision.intent,
            "decided_by": decision.decided_by,
            "router_answer": decision.answer,
        })
        if say is not None and done % 50 == 0:
            say(f"{done} samples routed")
    return records


def routing_report(routing_set: RoutingSet, records: list[dict]) -> dict:
    """The metrics of ``records`` plus who decided and what was skipped."""
    decided = {}
    for record in records:
        decided[record["decided_by"]] = decided.get(record["decided_by"], 0) + 1
    return {
        "benchmark": str(routing_set.path),
        "image_root": str(routing_set.image_root),
        **routing_metrics(records),
        "decided_by": decided,
        "skipped": {"missing_images": len(routing_set.missing_images),
                    "unreadable_images": len(routing_set.unreadable_images),
                    "listed": (routing_set.missing_images + routing_set.unreadable_images)[:LISTED]},
    }


def run_routing(
    benchmark: str | Path,
    *,
    mllm: str,
    out: str | Path,
    image_root: str | Path | None = None,
    tier_map: str | None = None,
    limit: int | None = None,
    fmt: str = "parquet",
    device: str | None = None,
    dtype: str | None = None,
    say: Say | None = None,
) -> dict:
    """``lens-general routing``: read (before loading any model), route, score, write; returns the report."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if fmt not in ("parquet", "jsonl"):
        raise UserError(f"--format takes parquet or jsonl, got {fmt!r}")
    routing_set = read_routing(benchmark, image_root=image_root, tier_map=parse_tier_map(tier_map), limit=limit)
    folder = out_folder(out)
    started = time.monotonic()
    backbone = load_mllm(mllm, device=device, dtype=dtype)
    records = route_all(routing_set, router_agent(backbone.generate), say=say)
    if not records:
        raise UserError(f"none of the {len(routing_set.samples)} routing images could be read: check --image-root")
    report = routing_report(routing_set, records)
    report["mllm"] = {"spec": mllm, "name_or_path": backbone.identity.get("name_or_path")}
    predictions = write_table(records, folder / f"routing_predictions.{fmt}", PREDICTION_COLUMNS, fmt=fmt)
    report["files"] = {"predictions": str(predictions), "metrics": str(folder / METRICS_FILE)}
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(report, folder / METRICS_FILE)
    return report


def summary_lines(report: dict) -> list[str]:
    """The routing report as a few printable lines."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [f"{'tier':<12}{'samples':>8}{'accuracy':>10}"]
    for tier, entry in report["per_tier"].items():
        lines.append(f"{tier:<12}{entry['samples']:>8}{pct(entry['accuracy']):>10}")
    lines.append(f"overall accuracy {pct(report['accuracy'])} on {report['samples']}; false triggers "
                 f"{pct(report['false_trigger_rate'])}, missed triggers {pct(report['missed_trigger_rate'])}")
    lines.append("decided by: " + ", ".join(f"{k} {v}" for k, v in sorted(report["decided_by"].items())))
    skipped = report["skipped"]
    if skipped["missing_images"] or skipped["unreadable_images"]:
        lines.append(f"warning: skipped {skipped['missing_images']} samples whose image is missing and "
                     f"{skipped['unreadable_images']} whose image cannot be read")
    return lines
