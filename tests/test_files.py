"""lens_manifests.files: every stage writes files and folders so that a failure leaves the old
version and no temporary behind (one rule, used by manifests, stores, runs and exports)."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens_manifests.files import folder_replaced_on_success, replaced_on_success, write_text_atomically
from lens_manifests.store import write_manifest


def _full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_text_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_text_atomically(path, "old\n")
    write_text_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(RuntimeError), replaced_on_success(path) as tmp:
        tmp.write_text("half of a")
        raise RuntimeError("the writer died")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with folder_replaced_on_success(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing under the name until the block ends
    assert (out / "a.txt").read_text() == "1"

    with folder_replaced_on_success(out) as tmp:  # an existing folder is replaced, not merged
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]

    with pytest.raises(OSError), folder_replaced_on_success(out) as tmp:
        (tmp / "c.txt").write_text("3")
        _full_disk()
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_manifest_that_fails_to_write_leaves_the_old_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.parquet"
    table = pa.table({"x": [1, 2]})
    from lens_manifests import store

    monkeypatch.setattr(store, "canonical", lambda t: t)  # a toy table, not the manifest schema
    write_manifest(table, path)
    before = path.read_bytes()

    def half_then_full(t, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        _full_disk()

    monkeypatch.setattr(pq, "write_table", half_then_full)
    with pytest.raises(OSError, match="No space"):
        write_manifest(pa.table({"x": [3]}), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]
