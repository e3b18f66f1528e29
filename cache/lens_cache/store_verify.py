"""Checking a feature store: structure against the schema, and every value against its checksum.

:func:`verify_store` (``lens-cache verify``) checks a store end to end; :func:`scan_store`
reads back every sample of some blocks (a build over an existing store uses it to find what
to recompute), :func:`unwritten_samples` lists the samples of finished blocks whose chunk is
not in storage. The arrays and their shapes, dtypes and chunks come from
:data:`lens_cache.store_format.SCHEMA` (:func:`~lens_cache.store_format.expected_arrays`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from lens_cache.errors import DamagedStoreError, StoreError
from lens_cache.identity import identity_hash
from lens_cache.store_format import (
    IMAGE_FAILED,
    MANIFEST_FILE,
    QUERY_FAILED,
    TEXT_LEN,
    array_spec,
    creation_arrays,
    expected_arrays,
    is_query_array,
    manifest_hash,
)
from lens_cache.store_reader import FeatureStore

#: Threads that read and check samples in :func:`scan_store` (decoding and crc32 release the GIL).
SCAN_THREADS = 4


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`; ``ok`` is False when any problem was found.

    ``damaged_blocks``: finished blocks with a damaged sample (the build recomputes them);
    ``notes``: what was not checked (``--quick``, a version-1 store without checksums).
    """

    url: str
    problems: list[str] = field(default_factory=list)
    failed_images: list[dict[str, Any]] = field(default_factory=list)
    failed_queries: list[dict[str, Any]] = field(default_factory=list)
    blocks_done: int = 0
    num_blocks: int = 0
    damaged_blocks: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: only the structure was checked (``--quick``): its OK says so
    quick: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> Iterator[str]:
        yield f"store {self.url}: blocks {self.blocks_done}/{self.num_blocks} done"
        yield from failure_lines(self.failed_images, self.failed_queries)
        for note in self.notes:
            yield f"note: {note}"
        for problem in self.problems:
            yield f"PROBLEM: {problem}"
        if not self.ok:
            yield f"NOT OK ({len(self.problems)} problem(s))"
        else:
            yield "OK (structure only: no value was read; run without --quick to check every sample)" if self.quick \
                else "OK"


def failure_lines(
    failed_images: Sequence[dict[str, Any]], failed_queries: Sequence[dict[str, Any]], *, most: int | None = None
) -> Iterator[str]:
    """One line per skipped image and per refused query (the first ``most`` of each, then a count)."""
    for kind, items in (("image", failed_images), ("query", failed_queries)):
        for k, item in enumerate(items):
            if most is not None and k == most:
                yield f"... and {len(items) - most} more skipped {kind}(s)"
                break
            if kind == "image":
                where = f"skipped image {item['image_index']} ({item['image_id']}, {item['reason']})"
                yield f"{where}: {item['image_path']}"
            else:
                where = f"skipped query {item['query_id']} (image {item['image_id']}, {item['reason']})"
                yield f"{where}: {item['text']!r}"


def stored_chunk_rows(store: FeatureStore, name: str) -> set[int]:
    """First-axis indices of the chunks of a per-sample array that exist in storage.

    Zarr does not store a chunk equal to the fill value (``write_empty_chunks`` is
    off), so a missing chunk of a feature array means the sample was never written.
    """
    fs, root = store.location.filesystem()
    prefix = f"{root}/{name}/c"
    if not fs.exists(prefix):
        return set()
    return {int(path.rstrip("/").rsplit("/", 1)[-1]) for path in fs.ls(prefix, detail=False)}


def check_filled(store: FeatureStore) -> list[str]:
    """Problems if any sample of a finished block was not written (STYLE 9)."""
    return [
        f"{name}: {len(missing)} sample(s) of finished blocks were never written (e.g. {sorted(missing)[:5]})"
        for name, missing in unwritten_samples(store).items()
    ]


def unfilled_blocks(store: FeatureStore) -> list[int]:
    """The finished blocks with a sample whose chunk is not listed in storage."""
    blocks: set[int] = set()
    for name, rows in unwritten_samples(store).items():
        images = store.image_index[sorted(rows)] if is_query_array(name) else np.asarray(sorted(rows))
        blocks |= {int(image) // store.block_size for image in images}
    return sorted(blocks)


def unwritten_samples(store: FeatureStore) -> dict[str, set[int]]:
    """Array name -> rows of finished blocks (not skipped samples) whose chunk folder is not listed.

    A structural check (one listing per array, no values read): a chunk deleted from a
    nested chunk folder leaves the folder, so only :func:`scan_store` sees every loss.
    """
    found: dict[str, set[int]] = {}
    done = store.done_flags()
    expected_images = {
        image
        for block in np.flatnonzero(done)
        for image in store.block_image_range(int(block))
        if store.image_failures[image] == 0
    }
    cached = np.isin(store.image_index, sorted(expected_images)) & (store.text_len > 0)  # refused texts: no chunk
    expected_queries = {int(q) for q in np.flatnonzero(cached)}
    lengths = store.variant_text_len
    # a query whose every other variant was refused has an all-zero variants row: no chunk either
    with_variants = {int(q) for q in np.flatnonzero(cached & (lengths > 0).any(axis=1))} if lengths.shape[1] else set()
    for name in store.sample_array_names:
        if array_spec(name).needs == "variants":
            expected = with_variants
        else:
            expected = expected_queries if is_query_array(name) else expected_images
        missing = expected - stored_chunk_rows(store, name)
        if missing:
            found[name] = missing
    return found


def scan_store(
    store: FeatureStore, blocks: Sequence[int] | None = None, *, progress: bool = False, label: str = "lens-cache verify"
) -> dict[int, list[str]]:
    """Read every sample of ``blocks`` (default: every finished block) and check it against its checksum.

    A missing chunk (zarr would read zeros), a chunk that does not decode and one whose
    bytes changed are all found; so are damaged checksums and block sizes / failure codes.
    A version-1 store has no checksums: its values are only decoded.

    Returns:
        block -> its problems (``image 3: images/sam: its chunk is missing``), damaged blocks only.
    """
    from lens_cache.progress import Progress

    if blocks is None:
        blocks = [int(block) for block in np.flatnonzero(store.done_flags())]
    sizes = {}
    for block in blocks:
        sizes[block] = (len(store.block_image_range(block)), len(store.block_query_range(block)))
    meter = Progress(
        total_images=sum(n for n, _ in sizes.values()),
        total_queries=sum(q for _, q in sizes.values()),
        enabled=progress,
        label=label,
    )
    damaged: dict[int, list[str]] = {}
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        for block, problems in zip(blocks, pool.map(store.check_block, blocks), strict=True):
            if problems:
                damaged[int(block)] = problems
            meter.advance(*sizes[block])
    meter.close()
    return damaged


def verify_store(
    url: str | Path, *, storage_options: dict | None = None, quick: bool = False, progress: bool = False
) -> VerifyReport:
    """Check a store end to end.

    Always (``quick``): every block done; every array present with the shape, dtype and
    chunks the attributes promise; identity hash == hash(identity); manifest hash == hash
    of the stored ``manifest.parquet``; the warm-start file == the recorded sha256; a
    chunk listed for every sample of every finished block.

    Unless ``quick``: every value read back and checked against its checksum (index
    arrays, block sizes and failure codes, every sample of every finished block), with a
    progress line on stderr when ``progress``.
    """
    store = FeatureStore.open(url, require_complete=False, storage_options=storage_options)
    attrs = store.attrs
    report = VerifyReport(url=str(url), num_blocks=store.num_blocks)
    done = store.done_flags()
    report.blocks_done = int(done.sum())
    if not done.all():
        report.problems.append(f"{int((~done).sum())} block(s) not written: rerun the build command")
    if not attrs.get("complete"):
        report.problems.append("the store is not marked complete")
    if identity_hash(attrs["identity"]) != attrs["identity_hash"]:
        report.problems.append("identity_hash does not match the recorded identity")
    try:
        manifest = store.unchecked_manifest()
        stored_hash = manifest_hash(manifest)
    except (OSError, pa.ArrowException) as error:
        report.problems.append(f"{MANIFEST_FILE} unreadable: {error}")
    else:
        if stored_hash != attrs["manifest_hash"]:
            report.problems.append(
                f"{MANIFEST_FILE} has hash {stored_hash[:12]}, the attributes say {attrs['manifest_hash'][:12]}"
            )
        if manifest.num_rows != store.num_queries:
            report.problems.append(f"{MANIFEST_FILE} has {manifest.num_rows} rows, the store {store.num_queries} queries")
    try:
        store.warm_start_bytes()
    except StoreError as error:
        report.problems.append(str(error))
    present = set(store.array_names())
    expected = expected_arrays(attrs)
    for name, (shape, dtype, chunks) in expected.items():
        if name not in present:
            report.problems.append(f"array {name} is missing")
            continue
        array = store.array(name)
        if tuple(array.shape) != shape or str(array.dtype) != dtype or tuple(array.chunks) != chunks:
            report.problems.append(
                f"array {name} is {tuple(array.shape)} {array.dtype} chunks {tuple(array.chunks)}, "
                f"expected {shape} {dtype} chunks {chunks}"
            )
    if not present >= set(expected):
        return report
    index_ok = True
    for name in creation_arrays(attrs):
        try:
            store.checked_index_array(name)
        except DamagedStoreError as error:
            report.problems.append(error.detail)
            index_ok = False
    if not index_ok:
        report.problems.append(f"the store's index or prefix arrays are damaged: {store.repair_hint}")
        return report
    try:
        report.problems += check_filled(store)
        if store.complete and not np.array_equal(store.array(QUERY_FAILED)[:], store.query_failures()):
            report.problems.append(f"{QUERY_FAILED} disagrees with {IMAGE_FAILED} and {TEXT_LEN}")
        report.failed_images = store.failed_images()
        report.failed_queries = store.failed_queries()
    except DamagedStoreError as error:
        report.problems.append(error.detail)
    if quick:
        report.quick = True
        return report
    if store.checksums is None:
        report.notes.append(
            f"format version {attrs['format_version']} has no checksums: values were decoded, not compared"
        )
    damaged = scan_store(store, progress=progress)
    listed = 0
    for block, problems in sorted(damaged.items()):
        for problem in problems:
            if listed < 20:
                report.problems.append(f"block {block}: {problem}")
            listed += 1
    if listed > 20:
        report.problems.append(f"... and {listed - 20} more damaged sample(s)")
    if damaged:
        report.damaged_blocks = sorted(damaged)
        report.problems.append(
            f"{len(damaged)} damaged block(s) {report.damaged_blocks[:10]}{'...' if len(damaged) > 10 else ''}: "
            f"{store.repair_hint}"
        )
    return report
