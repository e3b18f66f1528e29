"""Writing one block of a feature store: a worker's writer, which owns the block's chunks.

The step of a build's walk that writes features (``build`` -> ``store_writer`` -> ``block_job`` ->
here): :func:`lens_cache.block_job.run_block` extracts a block's features and hands each batch to
:meth:`BlockWriter.write_batch`, then the block's sizes, failure codes and checksums to
:meth:`BlockWriter.finish_block`, which sets the block's done flag last. The store was created
beforehand by the parent (:mod:`lens_cache.store_create`); the arrays a block's writer writes are
:data:`lens_cache.store_format.SCHEMA`'s ``block`` rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from lens_cache.store_format import (
    ATTRS_KEY,
    BITROUND_KEEPBITS,
    BLOCK_CHECKSUM_ARRAY,
    BLOCK_DONE,
    BY_BLOCK,
    IMAGE_FAILED,
    INPUT_SIZE,
    ORIGINAL_SIZE,
    StoreArray,
    block_checksum,
    checksum_array_name,
    is_query_array,
    sample_checksum,
    store_arrays,
    store_sample_arrays,
    stored_checksums,
)
from lens_cache.store_codec import Int8RowScaleCodec
from lens_cache.store_location import StoreLocation, open_group, quiet_numcodecs


class BlockWriter:
    """A store opened ``r+`` by one worker; writes whole chunks only.

    Writes cover whole chunks (a full padded text row, a whole block of sizes), so
    zarr never reads a chunk back to merge a partial update. Every sample's checksum is
    taken from the bytes it writes as they read back: bit-rounded first for a ``bitround`` store
    (the store's filter leaves rounded values as they are), through the int8 round trip of the
    array's own codec for an ``int8`` store (:mod:`lens_cache.store_codec`; the values written are
    the extractor's, which the codec quantises once).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.location = StoreLocation(url, dict(storage_options or {}))
        self.group = open_group(self.location, mode="r+")
        attrs = self.group.attrs[ATTRS_KEY]
        self.layers = tuple(attrs["layers"])
        #: the per-sample arrays of this store (with its text variants where it has them)
        self.sample_arrays = store_sample_arrays(attrs)
        self.hidden_size = int(attrs["hidden_size"])
        self.checksums = stored_checksums(attrs)  # None: a version-1 store (no checksums)
        #: the arrays a block's writer writes (SCHEMA's ``block`` rows), with this store's shapes
        self.layout: dict[str, StoreArray] = {
            array.name: array for array in store_arrays(attrs) if array.spec.written_by == BY_BLOCK
        }
        self._bitround = None
        if attrs["compression"] == "bitround":
            from numcodecs import BitRound

            self._bitround = BitRound(keepbits=BITROUND_KEEPBITS)
        with quiet_numcodecs():
            self.arrays = {name: self.group[name] for name in self.layout}
        #: array name -> its codec's int8 round trip (an ``int8`` store's feature arrays): what a value reads back as
        self._int8 = {name: array.serializer for name, array in self.arrays.items()
                      if isinstance(array.serializer, Int8RowScaleCodec)}

    def row_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one sample of ``name``: (P, d) image states, (T, d) a padded text row, (C, 64, 64) SAM's."""
        return self.layout[name].shape[1:]

    def empty_rows(self, name: str, rows: int) -> np.ndarray:
        """``rows`` zero samples of ``name`` in its stored dtype (a failed image's rows stay zero)."""
        return np.zeros((rows, *self.row_shape(name)), dtype=self.layout[name].dtype)

    def write_batch(self, image_start: int, query_start: int, arrays: dict[str, np.ndarray]) -> dict[str, list[int]]:
        """Write one batch: per-image arrays from ``image_start``, per-query from ``query_start``.

        Failed images are all-zero rows: zarr stores no chunk for them (and deletes
        any stale chunk an interrupted earlier run left).

        Returns:
            array name -> the checksum of each row written.
        """
        checksums = {}
        for name, values in arrays.items():
            if self._bitround is not None:
                values = self._bitround.decode(self._bitround.encode(values)).reshape(values.shape)
            start = query_start if is_query_array(name) else image_start
            self.arrays[name][start : start + len(values)] = values
            if name in self._int8:  # the checksum of what reads back, not of what went in
                values = self._int8[name].roundtrip(np.asarray(values, dtype=self.layout[name].dtype))
            checksums[name] = [sample_checksum(row) for row in values]
        return checksums

    def finish_block(
        self,
        block: int,
        image_start: int,
        original_size: np.ndarray,
        input_size: np.ndarray,
        failed: np.ndarray,
        checksums: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write the block's sizes, failure codes and checksums, then (last) its done flag.

        ``original_size``, ``input_size``, ``failed``: one row per image of the block, which starts
        at ``image_start``. ``checksums``: array name -> one per image (image arrays) or per query
        (text arrays) of the block.
        """
        images = slice(image_start, image_start + len(failed))
        self.arrays[ORIGINAL_SIZE][images] = original_size
        self.arrays[INPUT_SIZE][images] = input_size
        self.arrays[IMAGE_FAILED][images] = failed
        if self.checksums is not None:
            if checksums is None or set(checksums) != set(self.sample_arrays):
                raise RuntimeError(f"block {block}: the checksums of every sample array are needed")
            for name, values in checksums.items():
                if is_query_array(name):  # the block's row, padded: one whole chunk
                    row = np.zeros(self.checksums["block_queries"], dtype=np.uint32)
                    row[: len(values)] = values
                    self.arrays[checksum_array_name(name)][block] = row
                else:
                    self.arrays[checksum_array_name(name)][images] = np.asarray(values, dtype=np.uint32)
            self.arrays[BLOCK_CHECKSUM_ARRAY][block] = block_checksum(original_size, input_size, failed)
        self.arrays[BLOCK_DONE][block] = 1
