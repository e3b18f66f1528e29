"""Stage 1: run the frozen backbones once over a manifest and fill a feature store.

The work is cut into blocks (``block_size`` consecutive images and all their
queries). A block is written by exactly one process, data first, then its flag
``blocks/done[b]``; the store is marked ``complete`` after every flag. So a build
killed at any point is finished by rerunning the same command: finished blocks
are skipped, unfinished ones are redone from scratch, and no reader ever takes a
half-written sample as finished.

A build, top-down (:func:`build_cache`; each module's docstring says where it sits):

1. **Describe** the extractor (:mod:`lens_cache.extractor_info`): identity, sizes, every row's
   questions and L_t, and the states of the prompt's tokens before the image (the same for every
   image of a causal MLLM, computed once and written when the store is created, ``prefix/mllm_l{L}``).
2. **Prepare** the store (:mod:`lens_cache.store_writer`): create it (:mod:`lens_cache.store_create`)
   or reopen it for a resume, after checking it is the same build under the same library versions;
   a build over an existing store first reads back every sample of its finished blocks
   (:func:`~lens_cache.store_writer.repair_damage`, :mod:`lens_cache.store_blocks`): a damaged block
   loses its flag and is recomputed, a damaged index array or manifest file is rewritten, so rerunning
   the build command repairs a store exactly where it is damaged.
3. **Warm start**: before the first block, the MLLM's decoder layers k and k+1 for each cached layer k
   are written beside the features (:mod:`lens_cache.warm_start`), their sha256 in the store's identity.
4. **Blocks**: one :class:`~lens_cache.block_job.BlockJob` per block still missing (:func:`make_jobs`),
   run serially here (``workers=0``) or on dask.distributed workers (:mod:`lens_cache.distributed`);
   :func:`~lens_cache.block_job.run_block` extracts a block and writes it through a
   :class:`~lens_cache.block_writer.BlockWriter`, which records the crc32 of every sample with the
   block's sizes, before its flag. The arrays are :mod:`lens_cache.store_format`'s.
5. **Finish** (:func:`~lens_cache.store_writer.finalize_store`): every block and sample checked, then
   ``complete``, the last write.

The parent holds the store's writer lock (:mod:`lens_cache.locks`) for the whole build: a second
build of the same store is refused.

One bad sample never stops a build: an image that is missing, unreadable, of another size
than the manifest says or too thin for SAM's frame, and a query whose text the backbone
refuses (:class:`~lens_cache.errors.BadSampleError`), are skipped, said on stderr and kept
in the store's failure list (:mod:`lens_cache.store`); the rest is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from lens_cache.backbones.base import FeatureExtractor
from lens_cache.block_job import BlockJob, BlockResult, run_block
from lens_cache.block_writer import BlockWriter
from lens_cache.errors import UsageError
from lens_cache.extractor_info import ExtractorFactory, ExtractorInfo, describe_extractor
from lens_cache.identity import identity_hash
from lens_cache.locks import exclusive, no_readers
from lens_cache.progress import Progress, say
from lens_cache.store_blocks import missing_blocks
from lens_cache.store_create import feature_codecs
from lens_cache.store_format import manifest_hash
from lens_cache.store_location import StoreLocation, store_state
from lens_cache.store_plan import ImagePlan, plan_images
from lens_cache.store_reader import FeatureStore
from lens_cache.store_records import StoreDescription
from lens_cache.store_writer import check_libraries, finalize_store, prepare_store, record_library_mix, repair_damage
from lens_cache.warm_start import write_warm_start

DEFAULT_BLOCK_SIZE = 32
DEFAULT_COMPRESSION = "lossless"


# ----------------------------------------------------------------------------- the build


def build_cache(
    manifest: pa.Table,
    out_url: str | Path,
    extractor_factory: ExtractorFactory,
    *,
    spec: str,
    batch_size: int = 4,
    block_size: int | None = None,
    compression: str | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
    allow_library_change: bool = False,
) -> FeatureStore:
    """Cache the backbone features of every row of ``manifest`` into the store at ``out_url``.

    Args:
        manifest: rows grouped by image, ``query_id`` == row index (``lens_manifests``).
        out_url: local path or fsspec URL of the store (one per split/backbone/layers/prompt).
        extractor_factory: picklable zero-argument callable building the backbone; called
            once in this process (serial) or once per dask worker.
        spec: what the manifest is (``refcoco:val``), recorded in the store.
        batch_size: images per ``extract`` call.
        block_size: images per block (the unit of work, of resume, of ownership);
            None: the existing store's when resuming, else ``DEFAULT_BLOCK_SIZE`` (32).
        compression: ``lossless`` (zstd), ``bitround`` (7 mantissa bits + zstd), ``int8`` (int8 rows with a
            float16 absmax scale each + zstd: :mod:`lens_cache.store_codec`) or ``none``;
            None: the existing store's when resuming, else ``lossless``.
        workers: >0 runs the blocks on a local dask cluster of that many processes.
        scheduler: address of a running dask scheduler (``tcp://host:8786``); wins over ``workers``.
        overwrite: delete an existing lens store at ``out_url`` first.
        progress: print a progress line to stderr.
        allow_library_change: resume or repair a store built under other library versions (torch,
            transformers, ...), recording the mix (``store_writer.check_libraries``); else refused.

    Returns:
        The finished store, opened for reading.

    Raises:
        StoreError: the location holds something else or a store of another build.
        LockHeldError: another build is writing this store.
        UsageError / ManifestError (ValueErrors): bad arguments or a manifest that breaks
            the manifest contract.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise UsageError(f"workers must be >= 0, got {workers}")
    location = StoreLocation(str(out_url), dict(storage_options or {}))
    # The parent holds the lock for the whole build (dask workers write their blocks under it).
    # ... and, while it changes an existing store, no training or evaluation reads it (lens_cache.locks)
    with exclusive(location.url, command="lens-cache build", log=lambda line: say(progress, line)), \
            no_readers(location.url):
        return _build_cache(
            manifest,
            location,
            extractor_factory,
            spec=spec,
            batch_size=batch_size,
            block_size=block_size,
            compression=compression,
            workers=workers,
            scheduler=scheduler,
            overwrite=overwrite,
            progress=progress,
            allow_library_change=allow_library_change,
        )


def _build_cache(
    manifest: pa.Table,
    location: StoreLocation,
    extractor_factory: ExtractorFactory,
    *,
    spec: str,
    batch_size: int,
    block_size: int | None,
    compression: str | None,
    workers: int,
    scheduler: str | None,
    overwrite: bool,
    progress: bool,
    allow_library_change: bool = False,
) -> FeatureStore:
    """:func:`build_cache` under the store's locks: the steps of the module docstring, in order."""
    existed = not overwrite and store_state(location) == "lens"
    block_size, compression = _store_settings(location, block_size, compression, existed=existed)
    plan = plan_images(manifest, block_size)
    digest = manifest_hash(manifest)
    location, runner = _runner(location, extractor_factory, workers=workers, scheduler=scheduler)

    with runner:
        info = runner.describe(manifest.column("text").to_pylist(), manifest.column("is_sentence").to_pylist())
        description = StoreDescription(
            identity=info.identity,
            layers=info.layers,
            hidden_size=info.hidden_size,
            num_image_tokens=info.num_image_tokens,
            sam_channels=info.sam_channels,
            spec=spec,
            manifest_hash=digest,
            block_size=block_size,
            compression=compression,
        )
        store, library_mix = _prepare(
            location, description, manifest=manifest, plan=plan, info=info, overwrite=overwrite, existed=existed,
            allow_library_change=allow_library_change, progress=progress,
        )
        for row, reason in info.text_failures.items():
            say(progress, f"skipped query {row}: {reason}")
        for (row, variant), reason in (info.variant_failures or {}).items():
            say(progress, f"query {row}: question variant {variant} not cached: {reason}")
        if store.complete:
            say(
                progress,
                f"store {location.url} is already complete ({store.num_images} images, {store.num_queries} queries; "
                "every sample checked)",
            )
            return store

        if library_mix is not None:
            record_library_mix(location, library_mix)
        # Before any block: a resumed build rewrites the same bytes.
        runner.write_warm_start(location.url, location.storage_options, info.identity["warm_start"])
        _run_missing_blocks(runner, store, manifest=manifest, plan=plan, info=info, batch_size=batch_size,
                            progress=progress)

    finished = finalize_store(
        FeatureStore.open(location.url, require_complete=False, storage_options=location.storage_options)
    )
    say(
        progress,
        f"store {location.url} complete: {finished.num_images} images, {finished.num_queries} queries, "
        f"identity {identity_hash(info.identity)[:12]}, {finished.attrs['num_failed_images']} image(s) and "
        f"{len(finished.failed_queries())} other query(ies) skipped",
    )
    return finished


# ----------------------------------------------------------------------------- its steps


def _store_settings(
    location: StoreLocation, block_size: int | None, compression: str | None, *, existed: bool
) -> tuple[int, str]:
    """The block size and compression of the build: as asked, else the existing store's, else the defaults."""
    if (block_size is None or compression is None) and existed:
        existing = FeatureStore.open(location.url, require_complete=False, storage_options=location.storage_options)
        block_size = existing.block_size if block_size is None else block_size
        compression = existing.compression if compression is None else compression
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    compression = DEFAULT_COMPRESSION if compression is None else compression
    feature_codecs(compression)  # validates the name
    return block_size, compression


def _runner(
    location: StoreLocation, extractor_factory: ExtractorFactory, *, workers: int, scheduler: str | None
) -> tuple[StoreLocation, Any]:
    """Where the blocks run: this process (:class:`SerialRunner`), or dask workers, which see the store at
    an absolute path."""
    if not (scheduler or workers > 0):
        return location, SerialRunner(extractor_factory)
    from lens_cache.distributed import DaskRunner

    if location.url.startswith("memory://"):
        raise UsageError("a memory:// store lives in one process: build it with workers=0")
    if location.is_local:  # workers may run in another directory
        location = StoreLocation(str(location.local_path), location.storage_options)
    return location, DaskRunner(extractor_factory, workers=workers, scheduler=scheduler)


def _prepare(
    location: StoreLocation,
    description: StoreDescription,
    *,
    manifest: pa.Table,
    plan: ImagePlan,
    info: ExtractorInfo,
    overwrite: bool,
    existed: bool,
    allow_library_change: bool,
    progress: bool,
) -> tuple[FeatureStore, dict[str, str | None] | None]:
    """The store created, or reopened and repaired; and the library versions to record as a mix, if any."""
    store = prepare_store(
        location, description, manifest=manifest, plan=plan, text_len=info.text_len, overwrite=overwrite,
        prefix=info.prefix, variants=info.variants,
    )
    # a resume or repair writes blocks: under the versions the store was built with, or recorded
    library_mix = check_libraries(store, allow=allow_library_change) if existed else None
    if existed:  # resume or rerun: first find what of the store is damaged, to redo it
        store = repair_damage(
            store, manifest=manifest, plan=plan, text_len=info.text_len, progress=progress, prefix=info.prefix,
            variants=info.variants,
        )
    return store, library_mix


def _run_missing_blocks(
    runner: Any, store: FeatureStore, *, manifest: pa.Table, plan: ImagePlan, info: ExtractorInfo, batch_size: int,
    progress: bool,
) -> None:
    """Run every block whose done flag is not set, with a progress line over the whole store."""
    pending = missing_blocks(store)
    done_images = plan.num_images - sum(len(plan.image_range(b)) for b in pending)
    done_queries = plan.num_queries - sum(len(plan.query_range(b)) for b in pending)
    meter = Progress(
        total_images=plan.num_images,
        total_queries=plan.num_queries,
        done_images=done_images,
        done_queries=done_queries,
        enabled=progress,
    )
    if len(pending) < plan.num_blocks:
        meter.message(
            f"resuming {store.url}: {plan.num_blocks - len(pending)}/{plan.num_blocks} blocks already written"
        )
    jobs = make_jobs(manifest, plan, info, pending)
    for result in runner.run(
        jobs, url=store.url, storage_options=store.location.storage_options, batch_size=batch_size, progress=meter
    ):
        for image, _code, message in result.failures:
            meter.message(f"skipped image {image}: {message}")
    meter.close()


# ----------------------------------------------------------------------------- jobs


def make_jobs(manifest: pa.Table, plan: ImagePlan, info: ExtractorInfo, blocks: Iterable[int]) -> list[BlockJob]:
    """One :class:`~lens_cache.block_job.BlockJob` per block of ``blocks``: its images' paths and sizes (the
    manifest's), its usable queries' questions and every query's L_t, so a worker never reads the manifest."""
    paths = manifest.column("image_path").to_pylist()
    heights = manifest.column("height").to_pylist()
    widths = manifest.column("width").to_pylist()
    jobs = []
    for block in blocks:
        images = plan.image_range(block)
        rows = [int(plan.first_query[image]) for image in images]
        queries = plan.query_range(block)
        usable = [
            [q for q in range(int(plan.first_query[image]), plan.query_end(image)) if info.text_len[q] > 0]
            for image in images
        ]
        jobs.append(
            BlockJob(
                block=block,
                image_start=images.start,
                image_paths=tuple(paths[row] for row in rows),
                image_sizes=tuple((int(heights[row]), int(widths[row])) for row in rows),
                query_start=queries.start,
                questions=tuple(tuple(info.questions[q] for q in qs) for qs in usable),
                query_rows=tuple(tuple(q - queries.start for q in qs) for qs in usable),
                image_queries=tuple(plan.query_end(image) - int(plan.first_query[image]) for image in images),
                text_len=tuple(int(n) for n in info.text_len[queries.start : queries.stop]),
                **_job_variants(info, usable, queries),
            )
        )
    return jobs


def _job_variants(info: ExtractorInfo, usable: list[list[int]], queries: range) -> dict[str, Any]:
    """A job's ``variant_questions`` and ``variant_text_len`` (nothing where the store has no variants)."""
    if info.variants is None or info.variants.count <= 1 or info.variant_questions is None:
        return {}
    return {
        "variant_questions": tuple(tuple(tuple(info.variant_questions[q]) for q in qs) for qs in usable),
        "variant_text_len": tuple(
            tuple(int(n) for n in info.variants.lengths[q]) for q in range(queries.start, queries.stop)
        ),
    }


# ----------------------------------------------------------------------------- runners


class SerialRunner:
    """Runs every block in this process, with one extractor."""

    def __init__(self, extractor_factory: ExtractorFactory) -> None:
        self.extractor_factory = extractor_factory
        self._extractor: FeatureExtractor | None = None

    def __enter__(self) -> SerialRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._extractor = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = self.extractor_factory()
        return self._extractor

    def describe(self, texts: Sequence[str], is_sentence: Sequence[bool]) -> ExtractorInfo:
        return describe_extractor(self.extractor, texts, is_sentence)

    def write_warm_start(self, url: str, storage_options: dict, record: dict) -> None:
        write_warm_start(self.extractor, StoreLocation(url, storage_options), record)

    def run(
        self, jobs: Sequence[BlockJob], *, url: str, storage_options: dict, batch_size: int, progress: Progress
    ) -> Iterator[BlockResult]:
        writer = BlockWriter(url, storage_options)
        for job in jobs:
            yield run_block(job, self.extractor, writer, batch_size=batch_size, on_batch=progress.advance)


# ----------------------------------------------------------------------------- --limit


def first_images(manifest: pa.Table, count: int) -> pa.Table:
    """The rows of the first ``count`` images (``--limit``; query_id stays the row index)."""
    if count < 1:
        raise UsageError(f"--limit must be >= 1, got {count}")
    plan = plan_images(manifest, block_size=1)
    if count >= plan.num_images:
        return manifest
    # take() copies into fresh buffers; a zero-copy slice() would keep buffer offsets that
    # change the bytes lens_manifests.manifest_hash digests (its IPC stream), so the hash
    # of the stored manifest.parquet would no longer match the one recorded.
    return manifest.take(np.arange(int(plan.first_query[count])))
