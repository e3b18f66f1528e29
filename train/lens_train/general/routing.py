"""The routing benchmark (the LENS authors' ``eval_routing.py`` format): reader, tiers, metrics.

A file is JSON lines or one JSON array (or an object holding the array under
``samples`` / ``data`` / ``items``), one record per sample: an id, a tier, the user's
query and an image. Field names are read flexibly (case-insensitive):

- id: ``id`` / ``qid`` / ``question_id`` / ``sample_id`` / ``uid`` (default: the record's position);
- tier: ``tier`` / ``level`` / ``category`` / ``type``;
- query: ``query`` / ``question`` / ``text`` / ``prompt`` / ``instruction``;
- image: ``image`` / ``image_path`` / ``img`` / ``file_name`` / ``filename`` / ``image_file``
  (optional: a sample without one is routed without an image).

Tiers are normalised onto :data:`TIERS`: ``non-seg`` (no segmentation wanted),
``explicit`` ("segment the dog"), ``reasoning`` ("the thing used to cut bread"),
``mixed`` (a question and a segmentation request together). Spellings accepted: see
:data:`TIER_ALIASES` (case, spaces, ``-`` and ``_`` ignored); others are mapped with
``--tier-map old=new,...``. A sample should trigger segmentation iff its tier is not
``non-seg``.

Images are relative to ``--image-root`` (default: the benchmark file's folder) and must
stay inside it, symlinks followed (:func:`lens_core.paths.path_inside`: an absolute path, a ``..``
or a link leading out is a one-line error); a sample whose image is missing is skipped and counted.

Metrics (:func:`routing_metrics`): accuracy per tier and overall (a sample is right
when the router triggers segmentation iff it should), the false-trigger rate
(segmentation triggered on ``non-seg`` samples) and the missed-trigger rate (not
triggered on samples of the other tiers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .paths import confined, resolve_root

NON_SEG = "non-seg"
TIERS = (NON_SEG, "explicit", "reasoning", "mixed")
#: Normalised spelling (lower case; spaces, ``-``, ``_`` removed) -> tier.
TIER_ALIASES = {
    "nonseg": NON_SEG, "none": NON_SEG, "noseg": NON_SEG, "nonsegmentation": NON_SEG,
    "explicit": "explicit", "explicitseg": "explicit",
    "reason": "reasoning", "reasoning": "reasoning", "reasonseg": "reasoning",
    "mixed": "mixed", "hybrid": "mixed", "mix": "mixed",
}
ID_FIELDS = ("id", "qid", "question_id", "sample_id", "uid")
TIER_FIELDS = ("tier", "level", "category", "type")
QUERY_FIELDS = ("query", "question", "text", "prompt", "instruction")
IMAGE_FIELDS = ("image", "image_path", "img", "file_name", "filename", "image_file")
CONTAINER_KEYS = ("samples", "data", "items")


@dataclass(frozen=True)
class RoutingSample:
    """One routing sample.

    Attributes:
        id: as in the file (a string).
        tier: one of :data:`TIERS`; raw_tier: as written.
        query: the user's instruction.
        image: the resolved image file, or None (routed without an image).
    """

    id: str
    tier: str
    raw_tier: str
    query: str
    image: Path | None

    @property
    def should_trigger(self) -> bool:
        return self.tier != NON_SEG


@dataclass
class RoutingSet:
    """What :func:`read_routing` found: samples, and the ids skipped for a missing (or, once
    routed, unreadable) image."""

    path: Path
    image_root: Path
    samples: list[RoutingSample] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- tiers


def _key(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(text).strip().lower())


def parse_tier_map(text: str | None) -> dict[str, str]:
    """``--tier-map old=new,...`` -> {normalised old: tier}; each ``new`` must name a tier.

    Raises:
        UserError: a malformed entry or an unknown target tier (one line).
    """
    mapping: dict[str, str] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        old, eq, new = entry.partition("=")
        target = TIER_ALIASES.get(_key(new))
        if not eq or not old.strip() or target is None:
            raise UserError(f"--tier-map entry {entry.strip()!r} is not OLD=TIER with TIER one of "
                            f"{', '.join(TIERS)}: e.g. --tier-map 'level0=non-seg,level1=explicit'")
        mapping[_key(old)] = target
    return mapping


def normalise_tier(raw: Any, tier_map: Mapping[str, str] | None = None, *, where: str = "") -> str:
    """The tier of a raw value: ``tier_map`` first, then :data:`TIER_ALIASES`.

    Raises:
        UserError: neither knows it (one line naming ``--tier-map``).
    """
    key = _key(raw)
    tier = (tier_map or {}).get(key) or TIER_ALIASES.get(key)
    if tier is None:
        raise UserError(f"{where}unknown tier {raw!r}: tiers are {', '.join(TIERS)}; "
                        f"map it with --tier-map '{raw}=TIER'")
    return tier


# ----------------------------------------------------------------------------- reading


def load_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) of every record of a JSON-lines or JSON-array file.

    Raises:
        UserError: the file is missing, not UTF-8, or not JSON (one line naming the line).
    """
    if not path.is_file():
        raise UserError(f"--benchmark {path} not found: pass the routing benchmark's .jsonl or .json file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: pass the routing benchmark's .jsonl or .json file") from None
    whole = _whole_json(text, path)
    if whole is not None:
        return [(f"{path} record {i}", record) for i, record in enumerate(whole)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number} is not JSON ({error.msg}): the file must be JSON lines "
                            "or one JSON array") from None
    return records


def _whole_json(text: str, path: Path) -> list | None:
    """The records if ``text`` is one JSON array (or an object holding one), else None (JSON lines)."""
    stripped = text.strip()
    if not stripped.startswith(("[", "{")):
        return None
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        if stripped.startswith("["):
            raise UserError(f"{path} starts with '[' but is not a JSON array: fix the file") from None
        return None  # JSON lines whose first line is an object
    if isinstance(value, list):
        return value
    for key in CONTAINER_KEYS:
        if isinstance(value, dict) and isinstance(value.get(key), list):
            return value[key]
    return [value] if isinstance(value, dict) else None


def _field(record: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    lowered = {str(k).lower(): v for k, v in record.items()}
    for name in names:
        if lowered.get(name) not in (None, ""):
            return lowered[name]
    return None


def read_routing(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    tier_map: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> RoutingSet:
    """Every sample of a routing benchmark file (see the module docstring).

    Raises:
        UserError: the file is not JSON lines / a JSON array, a record lacks a tier or a
            query, a tier is unknown, an image path leads outside the image root (one line).
    """
    path = Path(path).expanduser()
    records = load_records(path)
    root = resolve_root(image_root if image_root is not None else path.parent, option="--image-root",
                        expected="FOLDER (the folder the benchmark's image paths are relative to)")
    found = RoutingSet(path=path, image_root=root)
    for position, (where, record) in enumerate(records):
        if limit is not None and len(found.samples) >= limit:
            break
        sample = parse_record(record, position, where=where, root=root, tier_map=tier_map)
        if sample.image is not None and not sample.image.is_file():
            found.missing_images.append(sample.id)
            continue
        found.samples.append(sample)
    if not found.samples:
        raise UserError(f"no routing sample with its image in {path} ({len(found.missing_images)} images "
                        f"missing under {root}): check --benchmark and --image-root")
    return found


def parse_record(
    record: Any, position: int, *, where: str, root: Path, tier_map: Mapping[str, str] | None = None
) -> RoutingSample:
    """One record -> :class:`RoutingSample` (image resolved under ``root``, not yet checked to exist)."""
    if not isinstance(record, Mapping):
        raise UserError(f"{where} is not a JSON object: each sample is an object with id, tier, query, image")
    raw_tier = _field(record, TIER_FIELDS)
    query = _field(record, QUERY_FIELDS)
    if raw_tier is None or not isinstance(query, str) or not query.strip():
        missing = "a tier (" + "/".join(TIER_FIELDS) + ")" if raw_tier is None else \
            "a query (" + "/".join(QUERY_FIELDS) + ")"
        raise UserError(f"{where} has no {missing}: every sample needs an id, a tier, a query and an image")
    identifier = _field(record, ID_FIELDS)
    image = _field(record, IMAGE_FIELDS)
    return RoutingSample(
        id=str(identifier) if identifier is not None else str(position),
        tier=normalise_tier(raw_tier, tier_map, where=f"{where}: "),
        raw_tier=str(raw_tier),
        query=query,
        image=None if image is None else confined(root, str(image), what=f"{where}: image"),
    )


# ----------------------------------------------------------------------------- metrics


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def routing_metrics(rows: Iterable[Mapping[str, Any]]) -> dict:
    """Per-tier and overall accuracy, false- and missed-trigger rates of routed samples.

    Args:
        rows: each with ``tier`` (one of :data:`TIERS`) and ``triggered`` (bool: the
            router asked for segmentation).
    Returns:
        ``accuracy``, ``per_tier`` ({tier: {samples, correct, accuracy}} for tiers present),
        ``false_trigger_rate`` (None without non-seg samples), ``missed_trigger_rate``
        (None without seg samples), and the counts behind them.
    """
    per_tier: dict[str, dict[str, Any]] = {}
    false_triggers = missed = non_seg = seg = 0
    for row in rows:
        tier, triggered = str(row["tier"]), bool(row["triggered"])
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}")
        should = tier != NON_SEG
        entry = per_tier.setdefault(tier, {"samples": 0, "correct": 0})
        entry["samples"] += 1
        entry["correct"] += triggered == should
        non_seg += not should
        seg += should
        false_triggers += triggered and not should
        missed += should and not triggered
    for entry in per_tier.values():
        entry["accuracy"] = entry["correct"] / entry["samples"]
    total = non_seg + seg
    correct = sum(e["correct"] for e in per_tier.values())
    return {
        "samples": total,
        "accuracy": _rate(correct, total),
        "per_tier": {tier: per_tier[tier] for tier in TIERS if tier in per_tier},
        "false_trigger_rate": _rate(false_triggers, non_seg),
        "missed_trigger_rate": _rate(missed, seg),
        "false_triggers": false_triggers,
        "missed_triggers": missed,
        "non_seg_samples": non_seg,
        "seg_samples": seg,
    }
