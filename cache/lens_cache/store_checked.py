"""An opened feature store's attributes and arrays, every value read back checked against its checksum.

:class:`CheckedStore` is what every reader of a store stands on: what the attributes say (sizes,
identity, layers), the Zarr arrays, the index arrays written at creation (checked whole against
``attrs["checksums"]["index"]``: :meth:`~CheckedStore.checked_index_array`), the rows of each block, and one
sample read back against the crc32 its block's writer recorded (:meth:`~CheckedStore.read_sample`). A
value that does not read back as written is a one-line :class:`~lens_cache.errors.DamagedStoreError`
naming the repair, or a :class:`~lens_cache.errors.StoreReplacedError` where another build replaced the
store under this reader.

Where it sits: the reader's API, :class:`lens_cache.store_reader.FeatureStore`, is this class plus
opening and what stage 2 asks for; the build's block bookkeeping (:mod:`lens_cache.store_blocks`) and
``verify`` (:mod:`lens_cache.store_verify`) read through it too. The arrays are those of
:data:`lens_cache.store_format.SCHEMA`; the contract is :mod:`lens_cache.store`'s docstring.
"""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np
import zarr
from lens_cache.errors import DamagedStoreError, StoreError, StoreReplacedError
from lens_cache.store_format import (
    ARRAY_GROUPS,
    ATTRS_KEY,
    BLOCK_CHECKSUM_ARRAY,
    BLOCK_DONE,
    FIRST_QUERY,
    IMAGE_FAILED,
    IMAGE_INDEX,
    INPUT_SIZE,
    ORIGINAL_SIZE,
    TEXT_LEN,
    block_checksum,
    checksum_array_name,
    is_query_array,
    sample_checksum,
    store_sample_arrays,
    stored_checksums,
    stored_sam_channels,
)
from lens_cache.store_location import StoreLocation, open_group, quiet_numcodecs
from lens_cache.store_plan import block_images, query_end
from lens_cache.store_records import StoreDescription


class CheckedStore:
    """A store's attributes and arrays, each value checked as it is read (see the module docstring).

    Made by :meth:`lens_cache.store_reader.FeatureStore.open`, which refuses what is not a store
    it can read; not opened on its own.
    """

    def __init__(self, location: StoreLocation, group: zarr.Group, attrs: dict) -> None:
        self.location = location
        self._group = group
        self._attrs = attrs
        self._arrays: dict[str, zarr.Array] = {}
        self._block_checksum_cache: dict[int, dict[str, np.ndarray]] = {}

    # -- what the store is (its attributes) ----------------------------------

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def attrs(self) -> dict:
        """The ``lens_cache`` attribute (a copy)."""
        return json.loads(json.dumps(self._attrs))

    @property
    def identity(self) -> dict:
        return self.attrs["identity"]

    @property
    def identity_hash(self) -> str:
        return self._attrs["identity_hash"]

    @property
    def manifest_hash(self) -> str:
        return self._attrs["manifest_hash"]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self._attrs["layers"])

    @property
    def hidden_size(self) -> int:
        return int(self._attrs["hidden_size"])

    @property
    def num_image_tokens(self) -> int:
        return int(self._attrs["num_image_tokens"])

    @property
    def sam_channels(self) -> int:
        """C of the (C, 64, 64) SAM embeddings: 256 for SAM, 64 for the toy SAM."""
        return stored_sam_channels(self._attrs)

    @property
    def num_images(self) -> int:
        return int(self._attrs["num_images"])

    @property
    def num_queries(self) -> int:
        return int(self._attrs["num_queries"])

    @property
    def num_blocks(self) -> int:
        return int(self._attrs["num_blocks"])

    @property
    def block_size(self) -> int:
        return int(self._attrs["block_size"])

    @property
    def max_text_len(self) -> int:
        return int(self._attrs["max_text_len"])

    @property
    def compression(self) -> str:
        return self._attrs["compression"]

    @property
    def complete(self) -> bool:
        return bool(self._attrs.get("complete", False))

    @property
    def checksums(self) -> dict | None:
        """``attrs["checksums"]``; None for a version-1 store (no checksums: values read unchecked)."""
        return stored_checksums(self._attrs)

    def description(self) -> StoreDescription:
        return StoreDescription(
            identity=self.identity,
            layers=self.layers,
            hidden_size=self.hidden_size,
            num_image_tokens=self.num_image_tokens,
            sam_channels=self.sam_channels,
            spec=self._attrs["spec"],
            manifest_hash=self.manifest_hash,
            block_size=self.block_size,
            compression=self.compression,
        )

    @property
    def repair_hint(self) -> str:
        """What repairs a damaged store: the build command, which recomputes only what is damaged."""
        return (
            f"repair it by rerunning the `lens-cache build ... --out {self.url}` command that made it "
            "(it recomputes only the damaged blocks)"
        )

    # -- arrays --------------------------------------------------------------

    def array(self, name: str) -> zarr.Array:
        """The zarr array ``name`` (e.g. ``images/sam``), for direct access."""
        try:
            return self._arrays[name]
        except KeyError:
            with quiet_numcodecs():
                array = self._group[name]
            self._arrays[name] = array
            return array

    def array_names(self) -> list[str]:
        """Every array of the store, sorted (``images/...``, ``queries/...``, ``blocks/done``)."""
        names = []
        for folder in ARRAY_GROUPS:
            with quiet_numcodecs():
                if folder not in self._group:  # ``prefix/``: absent before format version 4
                    continue
                names += [f"{folder}/{name}" for name in self._group[folder].array_keys()]
        return sorted(names)

    @property
    def sample_array_names(self) -> list[str]:
        """The per-sample arrays of this store (SAM, then image, text and text-variant states per layer)."""
        return store_sample_arrays(self._attrs)

    # -- index arrays (written at creation) ----------------------------------

    def checked_index_array(self, name: str) -> np.ndarray:
        """An array written at creation, checked against its recorded checksum."""
        try:
            values = self.array(name)[:]
        except OSError:
            raise
        except Exception as error:  # a chunk that does not decode (zstd, reshape, ...)
            raise DamagedStoreError(
                f"store {self.url}: {name} does not decode ({type(error).__name__}: {error}): {self.repair_hint}",
                detail=f"{name}: does not decode ({type(error).__name__}: {error})",
            ) from None
        recorded = (self.checksums or {}).get("index", {}).get(name)
        if recorded is not None and sample_checksum(values) != recorded:
            raise DamagedStoreError(
                f"store {self.url}: {name} is damaged (checksum mismatch): {self.repair_hint}",
                detail=f"{name}: checksum mismatch, its bytes changed",
            )
        return values

    @cached_property
    def text_len(self) -> np.ndarray:
        """(N_q,) int32: L_t of every query."""
        return self.checked_index_array(TEXT_LEN)

    @cached_property
    def image_index(self) -> np.ndarray:
        """(N_q,) int64: the image of every query."""
        return self.checked_index_array(IMAGE_INDEX)

    @cached_property
    def first_query(self) -> np.ndarray:
        """(N_img,) int64: the first query of every image."""
        return self.checked_index_array(FIRST_QUERY)

    @cached_property
    def _original_size(self) -> np.ndarray:
        return self._read_whole(ORIGINAL_SIZE)

    @cached_property
    def _input_size(self) -> np.ndarray:
        return self._read_whole(INPUT_SIZE)

    @cached_property
    def image_failures(self) -> np.ndarray:
        """(N_img,) uint8: 0 = cached, else a ``FAILURE_REASONS`` code (image skipped)."""
        return self._read_whole(IMAGE_FAILED)

    def _read_whole(self, name: str) -> np.ndarray:
        """A block-chunked bookkeeping array (checked per block by :meth:`block_checksums`)."""
        try:
            return self.array(name)[:]
        except OSError:
            raise
        except Exception as error:  # a chunk that does not decode
            raise DamagedStoreError(
                f"store {self.url}: {name} does not decode ({type(error).__name__}: {error}): {self.repair_hint}",
                detail=f"{name}: does not decode",
            ) from None

    # -- blocks --------------------------------------------------------------

    def block_image_range(self, block: int) -> range:
        """The images of ``block`` (:func:`~lens_cache.store_plan.block_images`)."""
        return block_images(block, self.block_size, self.num_images)

    def block_query_range(self, block: int) -> range:
        """The queries of ``block``: those of its images, contiguous rows."""
        images = self.block_image_range(block)
        return range(int(self.first_query[images.start]), self._query_end(images.stop - 1))

    def _query_end(self, image: int) -> int:
        return query_end(self.first_query, self.num_queries, image)

    def done_flags(self) -> np.ndarray:
        """(N_blocks,) bool: which blocks are written (read fresh every call)."""
        return self.array(BLOCK_DONE)[:] == 1

    # -- samples, checked against their block's checksums --------------------

    def _damaged(self, what: str, block: int, problem: str) -> StoreError:
        """The error of a sample that does not read back as written: the store was replaced under this
        reader (another build overwrote or removed it: :class:`StoreReplacedError`), else damage."""
        replaced = self.replaced()
        if replaced:
            return StoreReplacedError(
                f"store {self.url} was {replaced} while this process read it: the features read so far came from "
                "the store as it was; start this command again")
        return DamagedStoreError(
            f"store {self.url}: {what} is damaged ({problem}): {self.repair_hint}",
            detail=f"{what}: {problem}",
            block=block,
        )

    def replaced(self) -> str | None:
        """How the store on disk is no longer the one opened (``rebuilt``, ``removed``), or None."""
        try:
            now = open_group(self.location, mode="r").attrs.get(ATTRS_KEY)
        except Exception:  # noqa: BLE001 - no group there any more (removed, or being created)
            return "removed"
        if not isinstance(now, dict):
            return "removed or is being rebuilt"
        keys = ("build_id", "identity_hash", "manifest_hash", "layers")
        if any(now.get(key) != self._attrs.get(key) for key in keys):
            return "rebuilt"
        return None

    def chunk_exists(self, name: str, row: int) -> bool:
        """Whether the chunk holding row ``row`` (first axis) of ``name`` is in storage."""
        array = self.array(name)
        key = array.metadata.encode_chunk_key((row // array.chunks[0],) + (0,) * (array.ndim - 1))
        fs, root = self.location.filesystem()
        return bool(fs.exists(f"{root}/{name}/{key}"))

    def _read_rows(self, name: str, rows: int | slice, what: str, block: int) -> np.ndarray:
        """``array(name)[rows]``; a chunk that does not decode is a DamagedStoreError about ``what``."""
        try:
            return self.array(name)[rows]
        except OSError:
            raise
        except Exception as error:  # zarr's codecs raise RuntimeError, ValueError, ... for a broken chunk
            raise self._damaged(what, block, f"{name}: its chunk does not decode ({type(error).__name__}: {error})") from None

    def block_checksums(self, block: int) -> dict[str, np.ndarray] | None:
        """The recorded checksums of the samples of ``block`` (array name -> one per image / query of
        the block), after checking the block's sizes and failure codes; None for a version-1 store.

        Raises:
            DamagedStoreError: the checksums or the block's sizes / failure codes are damaged.
        """
        if self.checksums is None:
            return None
        cached = self._block_checksum_cache.get(block)
        if cached is not None:
            return cached
        images, queries = self.block_image_range(block), self.block_query_range(block)
        what = f"block {block} (images {images.start}-{images.stop - 1})"
        rows: dict[str, np.ndarray] = {}
        for name in self.sample_array_names:
            if is_query_array(name):
                rows[name] = self._read_rows(checksum_array_name(name), block, what, block)[: len(queries)]
            else:
                rows[name] = self._read_rows(checksum_array_name(name), slice(images.start, images.stop), what, block)
        recorded = int(self._read_rows(BLOCK_CHECKSUM_ARRAY, block, what, block))
        actual = block_checksum(
            self._read_rows(ORIGINAL_SIZE, slice(images.start, images.stop), what, block),
            self._read_rows(INPUT_SIZE, slice(images.start, images.stop), what, block),
            self._read_rows(IMAGE_FAILED, slice(images.start, images.stop), what, block),
        )
        if actual != recorded:
            raise self._damaged(what, block, "its image sizes or failure codes changed (checksum mismatch)")
        self._block_checksum_cache[block] = rows
        return rows

    def read_sample(self, name: str, row: int) -> np.ndarray:
        """Row ``row`` of the per-sample array ``name`` (an image, or a query's padded text row), checked.

        Raises:
            DamagedStoreError: its chunk is missing, does not decode, or holds other bytes than were written.
        """
        if is_query_array(name):
            image = int(self.image_index[row])
            what = f"query {row} (image {image})"
        else:
            image, what = row, f"image {row}"
        block = image // self.block_size
        values = self._read_rows(name, row, what, block)
        checksums = self.block_checksums(block)
        if checksums is None:  # format version 1: no checksums
            return values
        if is_query_array(name):
            recorded = int(checksums[name][row - int(self.first_query[block * self.block_size])])
        else:
            recorded = int(checksums[name][row - block * self.block_size])
        if sample_checksum(values) != recorded:
            if not self.chunk_exists(name, row):
                raise self._damaged(what, block, f"{name}: its chunk is missing")
            raise self._damaged(what, block, f"{name}: checksum mismatch, its bytes changed")
        return values
