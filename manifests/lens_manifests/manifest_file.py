"""A manifest's file: Parquet written atomically, self-describing, content-hashed.

A manifest file carries, in its Parquet key-value metadata:

* ``lens_manifest_version`` -- :data:`MANIFEST_FORMAT_VERSION`; readers refuse others;
* ``spec`` -- what it was built from (e.g. ``refcoco:val``), informative;
* ``content_hash`` -- :func:`manifest_hash` of the rows. The cache records this
  hash and refuses to be mixed with a different manifest.

The feature store a build makes from a manifest is another thing, :mod:`lens_cache.store`;
it keeps a copy of this file beside its arrays.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from lens_core.files import replaced_on_success

from .common import ManifestError
from .schema import MANIFEST_FORMAT_VERSION, MANIFEST_SCHEMA

VERSION_KEY = b"lens_manifest_version"
SPEC_KEY = b"spec"
HASH_KEY = b"content_hash"


def canonical(table: pa.Table) -> pa.Table:
    """``table`` cast to ``MANIFEST_SCHEMA`` (no metadata), one chunk per column.

    Raises :class:`ManifestError` if the columns do not fit the schema.
    """
    if table.schema.names != MANIFEST_SCHEMA.names:
        raise ManifestError(f"manifest columns {table.schema.names} differ from the schema's {MANIFEST_SCHEMA.names}")
    try:
        table = table.replace_schema_metadata(None).cast(MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        raise ManifestError(f"manifest does not fit the schema: {e}") from None
    return table.combine_chunks()


def manifest_hash(table: pa.Table) -> str:
    """sha256 (hex) of the manifest's rows: the Arrow IPC stream of :func:`canonical`.

    Independent of file metadata and of how the table happens to be chunked,
    so the same rows give the same hash in every run and after a Parquet
    round trip.
    """
    sink = pa.BufferOutputStream()
    t = canonical(table)
    # A zero-copy slice keeps buffer offsets that the IPC writer serialises differently from
    # freshly built arrays; `take` copies the rows into new contiguous buffers first.
    t = t.take(pa.array(range(t.num_rows), type=pa.int64()))
    with pa.ipc.new_stream(sink, t.schema) as writer:
        for batch in t.to_batches():
            writer.write_batch(batch)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def write_manifest(table: pa.Table, path: str | Path, *, spec: str | None = None) -> str:
    """Write ``table`` to ``path`` (Parquet) atomically; returns its content hash.

    The file is written to ``<path>.tmp`` and renamed over ``path``, so a
    reader sees either the old file or the complete new one; if writing fails
    (a full disk, a read-only folder) the temporary file is removed. ``spec``
    defaults to the one recorded in the table's own metadata, if any.
    """
    path = Path(path)
    digest = manifest_hash(table)
    # keep what the builder recorded (spec, seed, skipped images), then stamp version and hash
    meta = dict(table.schema.metadata or {})
    meta.update({VERSION_KEY: str(MANIFEST_FORMAT_VERSION).encode(), HASH_KEY: digest.encode()})
    if spec is not None:
        meta[SPEC_KEY] = spec.encode()
    out = canonical(table).replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_on_success(path) as tmp:
        pq.write_table(out, tmp)
    return digest


def read_manifest(path: str | Path, *, verify: bool = True) -> pa.Table:
    """Read a manifest written by :func:`write_manifest`.

    Checks the format version and the schema; with ``verify`` (default) also
    recomputes the content hash and compares it with the recorded one.
    Raises :class:`ManifestError` with a one-line reason otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise ManifestError(f"{path} is not a readable Parquet file: {e}") from None
    meta = table.schema.metadata or {}
    version = meta.get(VERSION_KEY)
    if version is None:
        raise ManifestError(f"{path} is not a lens manifest (no {VERSION_KEY.decode()} in its metadata)")
    if version != str(MANIFEST_FORMAT_VERSION).encode():
        raise ManifestError(
            f"{path} has manifest format version {version.decode()}, this code reads {MANIFEST_FORMAT_VERSION}; "
            "rebuild it"
        )
    try:
        table = canonical(table).replace_schema_metadata(meta)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    if verify:
        recorded = meta.get(HASH_KEY, b"").decode()
        actual = manifest_hash(table)
        if recorded != actual:
            raise ManifestError(f"{path}: content hash {actual[:12]} does not match the recorded {recorded[:12]}")
    return table


def recorded_hash(table: pa.Table) -> str | None:
    """The ``content_hash`` stored with a table read by :func:`read_manifest`, if any."""
    raw = (table.schema.metadata or {}).get(HASH_KEY)
    return raw.decode() if raw else None
