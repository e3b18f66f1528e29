"""Writing a benchmark run's outputs: a per-item table (Parquet or JSONL) and a JSON report.

Each file is written to a temporary name beside it and renamed when complete, so an
interrupted run never leaves a half-written table that looks finished.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lens_core.files import replaced_on_success, write_text_atomically

from ..errors import UserError

TABLE_FORMATS = ("parquet", "jsonl")


def out_folder(out: str | Path) -> Path:
    """``out`` created as a folder (UserError, one line, if it is a file)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder: give a folder (it is created if missing)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_table(
    records: Sequence[Mapping[str, Any]], path: Path, columns: Sequence[str], *, fmt: str = "parquet"
) -> Path:
    """``records`` (dicts with ``columns``) as Parquet or JSON lines at ``path``."""
    if fmt not in TABLE_FORMATS:
        raise UserError(f"--format takes {' or '.join(TABLE_FORMATS)}, got {fmt!r}")
    if fmt == "jsonl":
        text = "".join(json.dumps({c: r.get(c) for c in columns}, ensure_ascii=False) + "\n" for r in records)
        write_text_atomically(path, text, fsync=False)
        return path
    import pyarrow as pa  # on use: `lens-general --help` imports this module and must not wait for pyarrow
    import pyarrow.parquet as pq

    table = pa.table({c: [r.get(c) for r in records] for c in columns})
    with replaced_on_success(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    """``report`` as indented JSON at ``path``."""
    write_text_atomically(path, json.dumps(report, indent=2, default=str) + "\n", fsync=False)
    return path
