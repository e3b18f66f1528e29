"""One block of a build: the job, its result, and running it with an extractor.

The step of a build's walk that computes features (``build`` -> ``store_writer`` -> here ->
``block_writer`` -> ``store_format``): the parent (:mod:`lens_cache.build`) makes a :class:`BlockJob`
per pending block, which holds everything a worker needs to write its block (no manifest access
needed), and runs it in this process or on a dask worker (:mod:`lens_cache.distributed`);
:func:`run_block` decodes the block's images ahead in threads, extracts one batch while the previous
one is written (:class:`lens_cache.block_writer.BlockWriter`), and sets the block's done flag last,
returning a :class:`BlockResult`. What the parent learned from the extractor before creating the store
is :mod:`lens_cache.extractor_info`.

One bad sample never stops a block: an image that is missing, unreadable, of another size than the
manifest says or too thin for SAM's frame (:func:`load_image`), or whose every question the backbone
refused, is skipped and reported in the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from lens_cache.backbones.base import FeatureExtractor, ImageFeatures
from lens_cache.backbones.geometry import frame_problem
from lens_cache.block_writer import BlockWriter
from lens_cache.images import ImageReadError, decoded_rgb, opened_image
from lens_cache.store_format import (
    BAD_TEXT,
    FAILURE_REASONS,
    SAM_EMBEDDINGS,
    image_array_name,
    is_query_array,
    text_array_name,
    to_float16,
    variants_array_name,
)
from lens_manifests.common import displayed_size
from PIL import Image

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
        variant_questions: per image, per usable query, the questions of its other templates (variants 1..)
            whose text the backbone takes, in variant order (empty: one question per query).
        variant_text_len: per query of the block, L_t of each variant 1.. (0: none, -1: refused; see
            :class:`~lens_cache.store_records.StoreVariants`); empty where the store has no variants.
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
    variant_questions: tuple[tuple[tuple[str, ...], ...], ...] = ()
    variant_text_len: tuple[tuple[int, ...], ...] = ()

    def questions_to_ask(self, image: int) -> list[str]:
        """The questions of block-local ``image`` as one list for the extractor: variant 0 of every usable
        query (as before variants existed), then the other variants of each query in turn."""
        variants = self.variant_questions[image] if self.variant_questions else ()
        return [*self.questions[image], *(q for query in variants for q in query)]

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

    The file is read as every path reads images (:mod:`lens_cache.images`: pixels as displayed,
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
    size = displayed_size(image)
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
    writer: BlockWriter, job: BlockJob, images: range, features: Mapping[int, ImageFeatures], query_offsets: np.ndarray
) -> dict[str, np.ndarray]:
    """The float16 arrays of one batch of the block, ready for :meth:`BlockWriter.write_batch`.

    Args:
        images: block-local indices of the batch's images.
        features: block-local image index -> its features (failed images absent:
            their rows stay zero, which zarr does not store).
        query_offsets: (num_images + 1,) block-local first query of each image.

    Returns:
        array name -> (len(images), ...) for image arrays, (queries of the batch, T, d)
        for text arrays (right-padded with zeros).
    """
    d, sam_shape = writer.hidden_size, writer.row_shape(SAM_EMBEDDINGS.name)
    q_start, q_stop = int(query_offsets[images.start]), int(query_offsets[images.stop])
    arrays = {
        name: writer.empty_rows(name, q_stop - q_start if is_query_array(name) else len(images))
        for name in writer.sample_arrays
    }
    for i, feature in features.items():
        row = i - images.start
        where = f"image {job.image_start + i} ({job.image_paths[i]})"
        arrays[SAM_EMBEDDINGS.name][row] = to_float16(feature.sam_embedding, sam_shape, f"sam_embedding of {where}")
        asked = len(job.questions_to_ask(i))
        if len(feature.text_states) != asked:
            raise RuntimeError(f"backbone returned {len(feature.text_states)} text states for {asked} questions of {where}")
        # variant 0 of each usable query first, then each query's other variants (BlockJob.questions_to_ask)
        variant_states = iter(feature.text_states[len(job.questions[i]) :])
        variant_rows = [
            (job.query_rows[i][k], v, next(variant_states))
            for k in range(len(job.questions[i]) if job.variant_questions else 0)
            for v, length in enumerate(job.variant_text_len[job.query_rows[i][k]], start=1)
            if length > 0
        ]
        for layer in writer.layers:
            arrays[image_array_name(layer)][row] = to_float16(
                feature.image_states[layer],
                writer.row_shape(image_array_name(layer)),
                f"layer-{layer} image states of {where}",
            )
            for query, v, states in variant_rows:
                length = job.variant_text_len[query][v - 1]
                arrays[variants_array_name(layer)][query - q_start, v - 1, :length] = to_float16(
                    states[layer],
                    (length, d),
                    f"layer-{layer} text states of variant {v} of query {job.query_start + query} ({where})",
                )
            for k, states in enumerate(feature.text_states[: len(job.questions[i])]):
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
    writer: BlockWriter,
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
        name: np.zeros(job.num_queries if is_query_array(name) else job.num_images, dtype=np.uint32)
        for name in writer.sample_arrays
    }

    def collect(write: Future, images: range) -> None:
        """Wait for a batch's write and keep the checksums of what it wrote (block-local rows)."""
        for name, values in write.result().items():
            if is_query_array(name):
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
                extracted = extractor.extract([batch[i].image for i in ok], [job.questions_to_ask(i) for i in ok])
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
