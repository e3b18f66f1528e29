"""How a manifest's rows fall into images and blocks: the unit of a build's work, resume and repair.

A manifest has one row per query, an image's queries in consecutive rows (a promise of
:mod:`lens_manifests`). A store keeps one row per image and one per query, and a build cuts the
images into blocks of ``B`` consecutive images and all their queries (:func:`block_images`,
:func:`query_end`): a block is written by one writer, resumed and repaired as a whole.
:func:`plan_images` checks the manifest's promise and gives the :class:`ImagePlan`; the reader
finds a block's rows by the same two rules. Where this sits: below the writer
(:mod:`lens_cache.store_writer`), beside the format (:mod:`lens_cache.store_format`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from lens_cache.errors import UsageError


def block_images(block: int, block_size: int, num_images: int) -> range:
    """The images of ``block``: ``block_size`` consecutive images (the last block may have fewer)."""
    start = block * block_size
    return range(start, min(start + block_size, num_images))


def query_end(first_query: np.ndarray, num_queries: int, image: int) -> int:
    """One past the last query (row) of ``image``: an image's queries are contiguous rows."""
    return int(first_query[image + 1]) if image + 1 < len(first_query) else num_queries


@dataclass(frozen=True)
class ImagePlan:
    """How the manifest's rows fall into images and blocks.

    Attributes:
        first_query: (N_img,) int64, first row of each image (rows are grouped by image).
        image_index: (N_q,) int64, image of each row.
        block_size: images per block.
    """

    first_query: np.ndarray
    image_index: np.ndarray
    block_size: int

    @property
    def num_images(self) -> int:
        return len(self.first_query)

    @property
    def num_queries(self) -> int:
        return len(self.image_index)

    @property
    def num_blocks(self) -> int:
        return -(-self.num_images // self.block_size)

    def image_range(self, block: int) -> range:
        return block_images(block, self.block_size, self.num_images)

    def query_range(self, block: int) -> range:
        images = self.image_range(block)
        return range(int(self.first_query[images.start]), self.query_end(images.stop - 1))

    def query_end(self, image: int) -> int:
        """One past the last row of ``image``."""
        return query_end(self.first_query, self.num_queries, image)

    @property
    def max_block_queries(self) -> int:
        """The most queries of any block (the width of the query-checksum arrays)."""
        return max(len(self.query_range(block)) for block in range(self.num_blocks))


def plan_images(manifest: pa.Table, block_size: int) -> ImagePlan:
    """Group the manifest's rows by image, checking the manifest contract.

    Raises ManifestError (a ValueError) when ``query_id`` is not the row index or an
    image's rows are not contiguous (both are promises of ``lens_manifests``: a cached
    row is keyed by its manifest index); UsageError for a block size below 1.
    """
    from lens_manifests import ManifestError

    if block_size < 1:
        raise UsageError(f"block_size must be >= 1, got {block_size}")
    if manifest.num_rows == 0:
        raise ManifestError("the manifest has no rows: nothing to cache")
    missing = {"dataset", "split", "image_id", "image_path", "query_id", "text", "is_sentence"} - set(
        manifest.column_names
    )
    if missing:
        raise ManifestError(f"the manifest lacks column(s) {', '.join(sorted(missing))}")
    query_id = manifest.column("query_id").to_numpy()
    if not np.array_equal(query_id, np.arange(manifest.num_rows)):
        raise ManifestError("manifest query_id must equal the row index (0..N-1)")
    keys = list(
        zip(
            manifest.column("dataset").to_pylist(),
            manifest.column("split").to_pylist(),
            manifest.column("image_id").to_pylist(),
            strict=True,
        )
    )
    starts = [0] + [row for row in range(1, len(keys)) if keys[row] != keys[row - 1]]
    if len(starts) != len(set(keys)):
        raise ManifestError("manifest rows are not grouped by image (an image's queries must be contiguous)")
    first_query = np.asarray(starts, dtype=np.int64)
    counts = np.diff(np.append(first_query, manifest.num_rows))
    image_index = np.repeat(np.arange(len(first_query), dtype=np.int64), counts)
    return ImagePlan(first_query=first_query, image_index=image_index, block_size=block_size)
