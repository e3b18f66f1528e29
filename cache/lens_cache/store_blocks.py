"""A store's blocks as a build keeps track of them: which are missing, which are damaged, which to redo.

A block (``B`` consecutive images and all their queries, :mod:`lens_cache.store_plan`) is the unit
of a build's work: its writer sets its done flag last (:meth:`lens_cache.block_writer.BlockWriter.finish_block`),
a build runs the blocks still missing (:func:`missing_blocks`), and a build over an existing store
first reads back every sample of its finished blocks (:func:`scan_store`, :func:`check_block`) and
lists the samples whose chunk is not in storage (:func:`unwritten_samples`); a damaged block loses
its done flag (:func:`clear_done_flags`), so the build recomputes exactly it. ``lens-cache verify``
(:mod:`lens_cache.store_verify`) reports the same findings. Where it sits in a build's walk: used
by :mod:`lens_cache.build` and :mod:`lens_cache.store_writer`; it reads through
:class:`lens_cache.store_reader.FeatureStore`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from lens_cache.errors import DamagedStoreError
from lens_cache.store_format import BLOCK_DONE, array_spec, is_query_array
from lens_cache.store_location import StoreLocation, open_group
from lens_cache.store_reader import FeatureStore

#: Threads that read and check samples in :func:`scan_store` (decoding and crc32 release the GIL).
SCAN_THREADS = 4


def missing_blocks(store: FeatureStore) -> list[int]:
    """The blocks whose done flag is not set (read fresh): what a build still has to write."""
    return [int(block) for block in np.flatnonzero(~store.done_flags())]


# ----------------------------------------------------------------------------- damaged blocks: every sample read back


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
        for block, problems in zip(blocks, pool.map(partial(check_block, store), blocks), strict=True):
            if problems:
                damaged[int(block)] = problems
            meter.advance(*sizes[block])
    meter.close()
    return damaged


def check_block(store: FeatureStore, block: int) -> list[str]:
    """Read every sample of ``block`` and check it; the problems found (empty: intact)."""
    try:
        store.block_checksums(block)
    except DamagedStoreError as error:
        return [error.detail]
    problems = []
    images, queries = store.block_image_range(block), store.block_query_range(block)
    for name in store.sample_array_names:
        for row in queries if is_query_array(name) else images:
            try:
                store.read_sample(name, row)
            except DamagedStoreError as error:
                problems.append(error.detail)
    return problems


# ----------------------------------------------------------------------------- samples never written: the chunks in storage


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


# ----------------------------------------------------------------------------- redoing blocks


def clear_done_flags(location: StoreLocation, blocks: Iterable[int]) -> None:
    """Unset the done flag of ``blocks`` (damaged, or a sample lost): the build recomputes them."""
    done = open_group(location, mode="r+")[BLOCK_DONE]
    for block in blocks:
        done[block] = 0
