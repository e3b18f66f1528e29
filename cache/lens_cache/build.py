"""Stage 1: run the frozen backbones once over a manifest and fill a feature store.

The work is cut into blocks (``block_size`` consecutive images and all their
queries). A block is written by exactly one process, data first, then its flag
``blocks/done[b]``; the store is marked ``complete`` after every flag. So a build
killed at any point is finished by rerunning the same command: finished blocks
are skipped, unfinished ones are redone from scratch, and no reader ever takes a
half-written sample as finished.

Before the first block, the head's warm start is written beside the features: the
MLLM's decoder layers k and k+1 for each cached layer k (:func:`warm_start_file`),
its sha256 recorded in the store's identity.

Serial (``workers=0``) the parent runs every block itself; otherwise the blocks go
to dask.distributed workers (see :mod:`lens_cache.distributed`).

Writing the store itself (creating it, a block's arrays, resuming, finishing) is
:mod:`lens_cache.store_writer`'s; this module extracts the features and schedules the blocks.
The writer of a block also records the crc32 of every sample it writes, with the
block's sizes and before its flag (:mod:`lens_cache.store`). A build over an existing
store first reads back and checks every sample of its finished blocks
(:func:`~lens_cache.store_writer.repair_damage`): a damaged block loses its flag and is recomputed, a damaged
index array or manifest file is rewritten, so rerunning the build command repairs a
store exactly where it is damaged. The parent holds the store's writer lock
(:mod:`lens_cache.locks`) for the whole build: a second build of the same store is refused.

One bad sample never stops a build: an image that is missing, unreadable, of another size
than the manifest says or too thin for SAM's frame, and a query whose text the backbone
refuses (:class:`~lens_cache.errors.BadSampleError`), are skipped, said on stderr and kept
in the store's failure list (:mod:`lens_cache.store`); the rest is built.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from lens_cache.backbones.base import FeatureExtractor, ImageFeatures, NoDecoderLayers
from lens_cache.backbones.geometry import frame_problem
from lens_cache.errors import BadSampleError, UsageError
from lens_cache.identity import identity_hash, normalise_json
from lens_cache.images import ImageReadError, decoded_rgb, opened_image
from lens_cache.locks import exclusive
from lens_cache.progress import Progress, say
from lens_cache.store_format import (
    BAD_TEXT,
    FAILURE_REASONS,
    WARM_START_FILE,
    ImagePlan,
    StoreDescription,
    image_array_name,
    manifest_hash,
    sample_arrays,
    text_array_name,
    to_float16,
)
from lens_cache.store_location import StoreLocation, store_state
from lens_cache.store_reader import FeatureStore
from lens_cache.store_writer import (
    StoreWriter,
    feature_codecs,
    finalize_store,
    plan_images,
    prepare_store,
    repair_damage,
)
from PIL import Image

ExtractorFactory = Callable[[], FeatureExtractor]

DEFAULT_BLOCK_SIZE = 32
DEFAULT_COMPRESSION = "lossless"
#: images decoded ahead of the one being extracted (overlaps JPEG decoding with the GPU)
PREFETCH_IMAGES = 8
LOADER_THREADS = 4


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs to write one block (no manifest access needed).

    Attributes:
        block: block index.
        image_start: index of the block's first image.
        image_paths: path or fsspec URL of each image of the block.
        image_sizes: (h, w) of each image according to the manifest.
        query_start: index of the block's first query.
        questions: per image, the questions put to the MLLM (its usable queries only).
        query_rows: per image, the block-local query of each of its questions.
        image_queries: per image, how many queries it has (usable or not).
        text_len: per query of the block, L_t promised by tokenisation (0: text refused, skipped).
    """

    block: int
    image_start: int
    image_paths: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]
    query_start: int
    questions: tuple[tuple[str, ...], ...]
    query_rows: tuple[tuple[int, ...], ...]
    image_queries: tuple[int, ...]
    text_len: tuple[int, ...]

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def num_queries(self) -> int:
        return len(self.text_len)


@dataclass(frozen=True)
class BlockResult:
    """What a finished block reports back: counts, skipped images, time taken.

    ``failures`` holds (image index, FAILURE_REASONS code, message) per skipped image.
    """

    block: int
    num_images: int
    num_queries: int
    failures: tuple[tuple[int, int, str], ...]
    seconds: float


@dataclass(frozen=True)
class ExtractorInfo:
    """What the parent needs from the extractor before creating the store.

    ``identity`` is the extractor's plus ``warm_start`` (see :func:`warm_start_file`);
    ``questions``/``text_len`` have one entry per manifest row; a row whose text the
    backbone refused has ``text_len`` 0 and its reason in ``text_failures``.
    """

    identity: dict
    layers: tuple[int, ...]
    hidden_size: int
    num_image_tokens: int
    sam_channels: int
    questions: list[str]
    text_len: np.ndarray
    text_failures: dict[int, str]


def describe_extractor(extractor: FeatureExtractor, texts: Sequence[str], is_sentence: Sequence[bool]) -> ExtractorInfo:
    """The extractor's identity (with its warm-start record) and sizes, and every row's question and L_t."""
    questions = [
        extractor.question_for(text, bool(sentence)) for text, sentence in zip(texts, is_sentence, strict=True)
    ]
    text_len, failures = text_lengths(extractor, questions)
    warm_start, _ = warm_start_file(extractor)
    return ExtractorInfo(
        identity={**extractor.identity, "warm_start": warm_start},
        layers=tuple(int(layer) for layer in extractor.layers),
        hidden_size=int(extractor.hidden_size),
        num_image_tokens=int(extractor.num_image_tokens),
        sam_channels=int(extractor.sam_channels),
        questions=questions,
        text_len=text_len,
        text_failures=failures,
    )


def text_lengths(extractor: FeatureExtractor, questions: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """L_t of every question, 0 for one the backbone refuses (:class:`BadSampleError`), with its reason."""
    lengths = np.zeros(len(questions), dtype=np.int32)
    failures: dict[int, str] = {}
    for row, question in enumerate(questions):
        try:
            lengths[row] = extractor.num_text_tokens(question)
        except BadSampleError as error:
            failures[row] = str(error)
    return lengths, failures


def make_jobs(manifest: pa.Table, plan: ImagePlan, info: ExtractorInfo, blocks: Iterable[int]) -> list[BlockJob]:
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
            )
        )
    return jobs


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


# ----------------------------------------------------------------------------- images


#: ``images/failed`` code of each ``lens_cache.images.ImageReadError`` reason (missing, unreadable)
FAILURE_CODES = {reason: code for code, reason in FAILURE_REASONS.items()}


@dataclass(frozen=True)
class LoadedImage:
    """An image as RGB, or why it could not be used (``code`` from FAILURE_REASONS)."""

    image: Image.Image | None
    code: int = 0
    message: str = ""


def load_image(path: str, expected_size: tuple[int, int]) -> LoadedImage:
    """Read ``path`` (local or fsspec URL) as RGB; a missing/corrupt/mis-sized image is reported, not raised.

    The file is read as every path reads images (:mod:`lens_cache.images`: pixels as stored,
    any mode to RGB), so a live backbone sees what the cache stored.

    ``expected_size`` is the manifest's (h, w): masks are stored at that size, so an
    image of another size would be silently misaligned with its targets. The size and
    the shape are checked on the header, before the pixels are decoded; an image too
    thin for SAM's frame (:func:`~lens_cache.backbones.geometry.frame_problem`) is
    reported as ``bad_geometry``.
    """
    try:
        with opened_image(path) as image:
            problem = _header_problem(image, expected_size)
            if problem is not None:
                return problem
            return LoadedImage(decoded_rgb(image, path))
    except ImageReadError as error:
        return LoadedImage(None, FAILURE_CODES[error.reason], f"{error.reason}: {error}")


def _header_problem(image: Image.Image, expected_size: tuple[int, int]) -> LoadedImage | None:
    """Why an opened (not yet decoded) image cannot be used: another size than the manifest's, or
    a shape SAM's frame cannot take; None when it can."""
    size = (image.height, image.width)
    if size != tuple(expected_size):
        return LoadedImage(
            None, 3, f"size_mismatch: image is {size[0]}x{size[1]}, manifest says {expected_size[0]}x{expected_size[1]}"
        )
    problem = frame_problem(*size)
    if problem is not None:
        return LoadedImage(None, 4, f"bad_geometry: {problem}")
    return None


def prefetched(
    pool: ThreadPoolExecutor, function: Callable[..., Any], items: Sequence[tuple], ahead: int
) -> Iterator[Any]:
    """``function(*item)`` for each item, in order, computed up to ``ahead`` items in advance."""
    futures: list[Future] = []
    position = 0
    for index in range(len(items)):
        while position < len(items) and position < index + ahead:
            futures.append(pool.submit(function, *items[position]))
            position += 1
        yield futures[index].result()
        futures[index] = None  # type: ignore[call-overload]  # free the decoded image


# ----------------------------------------------------------------------------- a block


def pack_batch(
    writer: StoreWriter, job: BlockJob, images: range, features: Mapping[int, ImageFeatures], query_offsets: np.ndarray
) -> dict[str, np.ndarray]:
    """The float16 arrays of one batch of the block, ready for :meth:`StoreWriter.write_batch`.

    Args:
        images: block-local indices of the batch's images.
        features: block-local image index -> its features (failed images absent:
            their rows stay zero, which zarr does not store).
        query_offsets: (num_images + 1,) block-local first query of each image.

    Returns:
        array name -> (len(images), ...) for image arrays, (queries of the batch, T, d)
        for text arrays (right-padded with zeros).
    """
    d, sam_shape = writer.hidden_size, writer.row_shape("images/sam")
    q_start, q_stop = int(query_offsets[images.start]), int(query_offsets[images.stop])
    arrays = {
        name: writer.empty_rows(name, q_stop - q_start if name.startswith("queries/") else len(images))
        for name in sample_arrays(writer.layers)
    }
    for i, feature in features.items():
        row = i - images.start
        where = f"image {job.image_start + i} ({job.image_paths[i]})"
        arrays["images/sam"][row] = to_float16(feature.sam_embedding, sam_shape, f"sam_embedding of {where}")
        if len(feature.text_states) != len(job.questions[i]):
            raise RuntimeError(
                f"backbone returned {len(feature.text_states)} text states for {len(job.questions[i])} questions "
                f"of {where}"
            )
        for layer in writer.layers:
            arrays[image_array_name(layer)][row] = to_float16(
                feature.image_states[layer],
                writer.row_shape(image_array_name(layer)),
                f"layer-{layer} image states of {where}",
            )
            for k, states in enumerate(feature.text_states):
                query = job.query_rows[i][k]
                length = job.text_len[query]
                # A shape mismatch means num_text_tokens() and extract() tokenise differently: a backbone bug.
                arrays[text_array_name(layer)][query - q_start, :length] = to_float16(
                    states[layer],
                    (length, d),
                    f"layer-{layer} text states of query {job.query_start + query} ({where})",
                )
    return arrays


def run_block(
    job: BlockJob,
    extractor: FeatureExtractor,
    writer: StoreWriter,
    *,
    batch_size: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> BlockResult:
    """Extract and write one block; returns its result after the done flag is set.

    Batches of ``batch_size`` consecutive images go through ``extractor.extract``;
    images are decoded ahead in threads and each batch is written in a thread
    while the next one is extracted (at most one write in flight, bounding memory).
    """
    started = time.monotonic()
    original_size = np.zeros((job.num_images, 2), dtype=np.int32)
    input_size = np.zeros((job.num_images, 2), dtype=np.int32)
    failed = np.zeros(job.num_images, dtype=np.uint8)
    failures: list[tuple[int, int, str]] = []
    query_offsets = np.concatenate([[0], np.cumsum(job.image_queries)]).astype(np.int64)
    checksums = {
        name: np.zeros(job.num_queries if name.startswith("queries/") else job.num_images, dtype=np.uint32)
        for name in sample_arrays(writer.layers)
    }

    def collect(write: Future, images: range) -> None:
        """Wait for a batch's write and keep the checksums of what it wrote (block-local rows)."""
        for name, values in write.result().items():
            if name.startswith("queries/"):
                checksums[name][int(query_offsets[images.start]) : int(query_offsets[images.stop])] = values
            else:
                checksums[name][images.start : images.stop] = values

    with ThreadPoolExecutor(LOADER_THREADS) as loader, ThreadPoolExecutor(1) as write_pool:
        sources = list(zip(job.image_paths, job.image_sizes, strict=True))
        loaded = prefetched(loader, load_image, sources, PREFETCH_IMAGES)
        pending_write: tuple[Future, range] | None = None
        for batch_start in range(0, job.num_images, batch_size):
            images = range(batch_start, min(batch_start + batch_size, job.num_images))
            batch = {i: next(loaded) for i in images}
            for i, image in batch.items():
                if image.code == 0 and not job.questions[i]:
                    image = batch[i] = LoadedImage(None, BAD_TEXT, "bad_text: every query of it has a refused text")
                if image.code:
                    failed[i] = image.code
                    failures.append((job.image_start + i, image.code, f"{job.image_paths[i]}: {image.message}"))
            ok = [i for i, image in batch.items() if image.code == 0]
            features: dict[int, ImageFeatures] = {}
            if ok:
                extracted = extractor.extract([batch[i].image for i in ok], [list(job.questions[i]) for i in ok])
                if len(extracted) != len(ok):
                    raise RuntimeError(f"backbone returned features for {len(extracted)} of {len(ok)} images")
                features = dict(zip(ok, extracted, strict=True))
            for i, feature in features.items():
                original_size[i] = feature.original_size
                input_size[i] = feature.input_size
            arrays = pack_batch(writer, job, images, features, query_offsets)
            if pending_write is not None:
                collect(*pending_write)
            q_start, q_stop = int(query_offsets[images.start]), int(query_offsets[images.stop])
            pending_write = (
                write_pool.submit(writer.write_batch, job.image_start + images.start, job.query_start + q_start, arrays),
                images,
            )
            if on_batch is not None:
                on_batch(len(images), q_stop - q_start)
        if pending_write is not None:
            collect(*pending_write)
    writer.finish_block(job.block, job.image_start, original_size, input_size, failed, checksums)
    return BlockResult(
        block=job.block,
        num_images=job.num_images,
        num_queries=job.num_queries,
        failures=tuple(failures),
        seconds=time.monotonic() - started,
    )


# ----------------------------------------------------------------------------- warm start


def warm_start_layers(layer: int) -> tuple[int, int]:
    """The MLLM's decoder layers (0-based) that warm-start a head reading ``hidden_states[layer]``.

    Decoder layer ``layer`` is the one that reads ``hidden_states[layer]`` (paper 3.1: layers
    14 and 15 for layer-14 features), so an untrained head's first layer computes what the
    MLLM computes next.
    """
    return layer, layer + 1


def warm_start_file(extractor: FeatureExtractor) -> tuple[dict, bytes | None]:
    """The warm-start record and file of a store cached by ``extractor``: for each cached layer k, the
    MLLM's decoder layers k and k+1 (:func:`warm_start_layers`), each decoder layer saved once.

    Returns:
        the record ``{"file", "sha256", "head": sizes, "by_layer": {"k": [k, k + 1] or None},
        "layers": the first layer's pair or None}`` (plus ``"reason"`` when the first layer has
        none) and the safetensors bytes (keys ``decoder.<i>.<name>``, ``i`` the 0-based decoder
        layer); or ``{"layers": None, "reason": why}`` and None when no cached layer has its
        two layers in the MLLM (``k`` is its last layer, or it exposes none).
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    by_layer: dict[str, list[int] | None] = {}
    reasons: dict[int, str] = {}
    head = None
    for layer in extractor.layers:
        pair = warm_start_layers(layer)
        try:
            head, state_dicts = extractor.decoder_layers(pair)
        except NoDecoderLayers as why:
            by_layer[str(layer)] = None
            reasons[layer] = f"no warm start for layer {layer}: {why}"
            continue
        by_layer[str(layer)] = list(pair)
        for index, state in zip(pair, state_dicts):
            tensors.update({f"decoder.{index}.{name}": t.contiguous() for name, t in state.items()})
    first = extractor.layers[0]
    if not tensors:
        return {"layers": None, "reason": reasons[first]}, None
    data = save(tensors)
    record = {"file": WARM_START_FILE, "layers": by_layer[str(first)], "by_layer": by_layer,
              "sha256": hashlib.sha256(data).hexdigest(), "head": head}
    if first in reasons:
        record["reason"] = reasons[first]
    return record, data


def write_warm_start(extractor: FeatureExtractor, location: StoreLocation, record: dict) -> None:
    """Write the warm-start file that ``record`` (the store's ``identity["warm_start"]``) describes.

    Written atomically (temporary name + rename where local); nothing when the record holds none.

    Raises:
        RuntimeError: the extractor's layers are not the ones the record was made from.
    """
    ours, data = warm_start_file(extractor)
    if normalise_json(ours) != normalise_json(record):
        raise RuntimeError(f"the backbone's warm start {ours} is not the one the store records ({record})")
    if data is not None:
        location.write_bytes(WARM_START_FILE, data)


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
        writer = StoreWriter(url, storage_options)
        for job in jobs:
            yield run_block(job, self.extractor, writer, batch_size=batch_size, on_batch=progress.advance)


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
        compression: ``lossless`` (zstd), ``bitround`` (7 mantissa bits + zstd) or ``none``;
            None: the existing store's when resuming, else ``lossless``.
        workers: >0 runs the blocks on a local dask cluster of that many processes.
        scheduler: address of a running dask scheduler (``tcp://host:8786``); wins over ``workers``.
        overwrite: delete an existing lens store at ``out_url`` first.
        progress: print a progress line to stderr.

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
    with exclusive(location.url, command="lens-cache build", log=lambda line: say(progress, line)):
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
) -> FeatureStore:
    existed = not overwrite and store_state(location) == "lens"
    if (block_size is None or compression is None) and existed:
        existing = FeatureStore.open(location.url, require_complete=False, storage_options=location.storage_options)
        block_size = existing.block_size if block_size is None else block_size
        compression = existing.compression if compression is None else compression
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    compression = DEFAULT_COMPRESSION if compression is None else compression
    feature_codecs(compression)  # validates the name
    plan = plan_images(manifest, block_size)
    digest = manifest_hash(manifest)

    if scheduler or workers > 0:
        from lens_cache.distributed import DaskRunner

        if location.url.startswith("memory://"):
            raise UsageError("a memory:// store lives in one process: build it with workers=0")
        if location.is_local:  # workers may run in another directory
            location = StoreLocation(str(location.local_path), location.storage_options)

        runner: Any = DaskRunner(extractor_factory, workers=workers, scheduler=scheduler)
    else:
        runner = SerialRunner(extractor_factory)

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
        store = prepare_store(
            location, description, manifest=manifest, plan=plan, text_len=info.text_len, overwrite=overwrite
        )
        if existed:  # resume or rerun: first find what of the store is damaged, to redo it
            store = repair_damage(store, manifest=manifest, plan=plan, text_len=info.text_len, progress=progress)
        for row, reason in info.text_failures.items():
            say(progress, f"skipped query {row}: {reason}")
        if store.complete:
            say(
                progress,
                f"store {location.url} is already complete ({store.num_images} images, {store.num_queries} queries; "
                "every sample checked)",
            )
            return store

        # Before any block: a resumed build rewrites the same bytes.
        runner.write_warm_start(location.url, location.storage_options, info.identity["warm_start"])
        pending = store.missing_blocks()
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
                f"resuming {location.url}: {plan.num_blocks - len(pending)}/{plan.num_blocks} blocks already written"
            )
        jobs = make_jobs(manifest, plan, info, pending)
        for result in runner.run(
            jobs, url=location.url, storage_options=location.storage_options, batch_size=batch_size, progress=meter
        ):
            for image, _code, message in result.failures:
                meter.message(f"skipped image {image}: {message}")
        meter.close()

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
