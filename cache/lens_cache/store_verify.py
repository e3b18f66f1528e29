"""Checking a feature store: structure against the schema, and every value against its checksum.

:func:`verify_store` (``lens-cache verify``) checks a store end to end: its attributes and files,
every array against :data:`lens_cache.store_format.SCHEMA`
(:func:`~lens_cache.store_format.expected_arrays`), the arrays written at creation, and (unless
``quick``) every sample of every finished block, read back by the block bookkeeping a build uses to
find what to recompute (:func:`lens_cache.store_blocks.scan_store`,
:func:`~lens_cache.store_blocks.check_filled`). It reads through
:class:`lens_cache.store_reader.FeatureStore` and writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from lens_cache.errors import DamagedStoreError, StoreError
from lens_cache.identity import identity_hash
from lens_cache.store_blocks import check_filled, scan_store
from lens_cache.store_format import (
    IMAGE_FAILED,
    MANIFEST_FILE,
    QUERY_FAILED,
    TEXT_LEN,
    creation_arrays,
    expected_arrays,
    manifest_hash,
)
from lens_cache.store_reader import FeatureStore


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
    report = VerifyReport(url=str(url), num_blocks=store.num_blocks)
    _check_description(store, report)
    if not _check_arrays(store, report):
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
            f"format version {store.attrs['format_version']} has no checksums: values were decoded, not compared"
        )
    _check_samples(store, report, progress=progress)
    return report


def _check_description(store: FeatureStore, report: VerifyReport) -> None:
    """Every block done, the store complete, its identity hash, its manifest file and its warm-start file."""
    attrs = store.attrs
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


def _check_arrays(store: FeatureStore, report: VerifyReport) -> bool:
    """Every array as the attributes promise it, and the arrays written at creation against their checksums;
    whether the samples can be checked next (every array there, the index and prefix arrays intact)."""
    attrs = store.attrs
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
        return False
    index_ok = True
    for name in creation_arrays(attrs):
        try:
            store.checked_index_array(name)
        except DamagedStoreError as error:
            report.problems.append(error.detail)
            index_ok = False
    if not index_ok:
        report.problems.append(f"the store's index or prefix arrays are damaged: {store.repair_hint}")
    return index_ok


def _check_samples(store: FeatureStore, report: VerifyReport, *, progress: bool) -> None:
    """Every sample of every finished block read back against its checksum (the first 20 problems listed)."""
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
