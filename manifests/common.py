"""Pieces every dataset adapter shares: the error type, path checks, row assembly.

Adapters collect :class:`QueryRow` objects in their final order (grouped by
image, deterministic) and hand them to :func:`rows_to_table`, which numbers
them (``query_id`` = row index) and returns a table of ``MANIFEST_SCHEMA``.
Images an adapter had to leave out are reported, not hidden: they are logged
and listed, as JSON, under the table's schema metadata key ``lens_skipped``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .schema import MANIFEST_SCHEMA, TASKS

log = logging.getLogger("lens_manifests")

#: schema metadata key holding the JSON list of skipped images ``[{"path", "reason"}]``
SKIPPED_KEY = b"lens_skipped"

DATA_ROOT_HINT = "point --data-root at LISA's dataset folder"


class ManifestError(ValueError):
    """A manifest cannot be built or read; the message says what and where, in one line."""


@dataclass(frozen=True, slots=True)
class QueryRow:
    """One query of a manifest, before numbering (see ``MANIFEST_SCHEMA`` for the fields)."""

    dataset: str
    task: str
    split: str
    image_id: str
    image_path: str
    text: str
    is_sentence: bool
    height: int
    width: int
    mask_rle: str
    ignore_rle: str | None
    source_id: str | None


@dataclass(frozen=True, slots=True)
class Skipped:
    """An image an adapter left out, and why."""

    path: str
    reason: str


def require_path(path: Path, what: str, *, is_dir: bool) -> Path:
    """Return ``path`` if it exists as a folder/file, else raise a one-line :class:`ManifestError`."""
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        raise ManifestError(f"{what}: expected {kind} {path} not found; {DATA_ROOT_HINT}")
    return path


def absolute(path: Path) -> str:
    """Absolute path string without resolving symlinks (a data root may be a link farm)."""
    return os.path.abspath(path)


def stable_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys``.

    Seeding per item (e.g. per image) keeps every item's draw independent of
    which other items exist or in which order they are processed.
    """
    digest = hashlib.sha256("\x1f".join(keys).encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def rows_to_table(rows: list[QueryRow], *, skipped: list[Skipped] | None = None) -> pa.Table:
    """Number ``rows`` in order and build a ``MANIFEST_SCHEMA`` table."""
    for r in rows:
        if r.task not in TASKS:
            raise ValueError(f"task {r.task!r} is not one of {TASKS}")
    columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for i, r in enumerate(rows):
        columns["query_id"].append(i)
        for name in MANIFEST_SCHEMA.names:
            if name != "query_id":
                columns[name].append(getattr(r, name))
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    return with_skipped(table, skipped or [])


def get_skipped(table: pa.Table) -> list[dict[str, str]]:
    """The images an adapter skipped, as recorded in the table's metadata."""
    raw = (table.schema.metadata or {}).get(SKIPPED_KEY)
    return json.loads(raw) if raw else []


def with_skipped(table: pa.Table, skipped: list[Skipped] | list[dict[str, str]]) -> pa.Table:
    """Return ``table`` with ``skipped`` recorded in its schema metadata (and logged)."""
    items = [s if isinstance(s, dict) else {"path": s.path, "reason": s.reason} for s in skipped]
    if items:
        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in items[:3])
        more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
        log.warning("skipped %d image(s): %s%s", len(items), shown, more)
    meta = dict(table.schema.metadata or {})
    meta[SKIPPED_KEY] = json.dumps(items).encode("utf-8")
    return table.replace_schema_metadata(meta)


def concat_manifests(tables: list[pa.Table]) -> pa.Table:
    """Concatenate manifests and renumber ``query_id``; skipped lists are merged."""
    skipped: list[dict[str, str]] = []
    plain = []
    for t in tables:
        skipped.extend(get_skipped(t))
        plain.append(t.replace_schema_metadata(None))
    if not plain:
        return rows_to_table([], skipped=None)
    table = pa.concat_tables(plain).combine_chunks()
    ids = pa.array(np.arange(table.num_rows, dtype=np.int64), type=pa.int64())
    table = table.set_column(table.schema.get_field_index("query_id"), MANIFEST_SCHEMA.field("query_id"), ids)
    meta = {SKIPPED_KEY: json.dumps(skipped).encode("utf-8")}
    return table.replace_schema_metadata(meta)
