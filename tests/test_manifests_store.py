"""Manifest files and the registry: hashing, atomic write/read, specs and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lens_manifests import (
    MANIFEST_SCHEMA,
    ManifestError,
    build_manifest,
    manifest_hash,
    parse_spec,
    read_manifest,
    recorded_hash,
    write_manifest,
)


def _reason_root(root: Path, target_x1: int = 10) -> Path:
    d = root / "reason_seg" / "ReasonSeg" / "val"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / f"{name}.jpg")
        shapes = [{"label": "target", "points": [[2, 2], [target_x1, 2], [target_x1, 9], [2, 9]]}]
        (d / f"{name}.json").write_text(json.dumps({"text": [f"q {name}"], "is_sentence": True, "shapes": shapes}))
    return root


def test_hash_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    root = _reason_root(tmp_path / "one")
    h1 = manifest_hash(build_manifest("reasonseg:val", root))
    h2 = manifest_hash(build_manifest("reasonseg:val", root))
    assert h1 == h2 and len(h1) == 64
    other = _reason_root(tmp_path / "two", target_x1=11)  # one column more in every mask
    t_other = build_manifest("reasonseg:val", other)
    assert manifest_hash(t_other) != h1
    # metadata and chunking do not enter the hash
    t = build_manifest("reasonseg:val", root)
    assert manifest_hash(t.replace_schema_metadata({b"x": b"y"})) == h1
    assert manifest_hash(pa.concat_tables([t.slice(0, 1), t.slice(1)])) == h1


def test_write_read_round_trip(tmp_path: Path) -> None:
    table = build_manifest("reasonseg:val", _reason_root(tmp_path))
    path = tmp_path / "out" / "m.parquet"
    digest = write_manifest(table, path)
    assert not (tmp_path / "out" / "m.parquet.tmp").exists()
    back = read_manifest(path)
    assert back.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert back.to_pylist() == table.to_pylist()
    assert recorded_hash(back) == digest == manifest_hash(back)
    meta = back.schema.metadata
    assert meta[b"lens_manifest_version"] == b"1" and meta[b"spec"] == b"reasonseg:val" and meta[b"seed"] == b"0"


def test_read_refuses_foreign_or_tampered_files(tmp_path: Path) -> None:
    table = build_manifest("reasonseg:val", _reason_root(tmp_path))
    path = tmp_path / "m.parquet"
    write_manifest(table, path)
    raw = pq.read_table(path)
    meta = dict(raw.schema.metadata)

    pq.write_table(raw.replace_schema_metadata({**meta, b"lens_manifest_version": b"999"}), tmp_path / "v.parquet")
    with pytest.raises(ManifestError, match="format version 999"):
        read_manifest(tmp_path / "v.parquet")

    changed = raw.set_column(raw.schema.get_field_index("text"), "text", pa.array(["edited", "q b"]))
    pq.write_table(changed.replace_schema_metadata(meta), tmp_path / "t.parquet")
    with pytest.raises(ManifestError, match="content hash"):
        read_manifest(tmp_path / "t.parquet")
    assert read_manifest(tmp_path / "t.parquet", verify=False).num_rows == 2

    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ManifestError, match="not a lens manifest"):
        read_manifest(tmp_path / "plain.parquet")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "missing.parquet")


def test_spec_errors_are_one_line() -> None:
    assert parse_spec("refcoco") == ("refcoco", "train")
    assert parse_spec(" RefCOCO+:testB ") == ("refcoco+", "testB")
    with pytest.raises(ManifestError, match=r"unknown dataset 'imagenet'.*known: reasonseg, refcoco") as err:
        build_manifest("imagenet:val", "/tmp")
    assert "\n" not in str(err.value)
    with pytest.raises(ManifestError, match="unknown split 'test' for refcoco;"):
        parse_spec("refcoco:test")
    with pytest.raises(ManifestError, match="refcoco needs its data: point --data-root at LISA's dataset folder"):
        build_manifest("refcoco:val", None)
    with pytest.raises(ManifestError, match=r"data root /nonexistent/lisa not found; point --data-root"):
        build_manifest("refcoco:val", "/nonexistent/lisa")
    assert issubclass(ManifestError, ValueError)


def test_hash_does_not_depend_on_slicing(tmp_path):
    """A zero-copy slice and the same rows read back from Parquet hash alike."""
    import pyarrow.parquet as pq

    from lens_manifests import build_manifest, manifest_hash

    table = build_manifest("synthetic-refer:val", None)
    part = table.slice(3, 10)
    pq.write_table(part, tmp_path / "part.parquet")
    assert manifest_hash(part) == manifest_hash(pq.read_table(tmp_path / "part.parquet"))
