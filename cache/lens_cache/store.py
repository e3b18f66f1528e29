"""The feature store: the versioned, self-describing contract between stage 1 and stage 2.

One Zarr v3 group holds the features of one (dataset split, backbone, layer set,
prompt template). Everything that made it what it is sits in the group attribute
``lens_cache`` (pinned by ``tests/test_cache_store.py``), the manifest it was built from sits beside
the arrays as ``manifest.parquet``, and a reader refuses a store that is not
finished or not what it expects.

Layout (``N_img`` images, ``N_q`` queries, ``d`` hidden size, ``T`` = max_text_len,
``B`` = block_size, ``C`` = sam_channels: SAM's prompt width, 256 for SAM, 64 for the
toy SAM; "chunk" is the chunk shape)::

    zarr.json                      attrs["lens_cache"]: format_version, identity, ... complete
    manifest.parquet               the manifest (one row per query, query_id == row)
    warm_start/decoder_layers.safetensors  the MLLM's decoder layers k, k+1 per cached layer k (head warm start)
    images/mllm_l{L}               (N_img, 576, d)      float16  chunk (1, 576, d)
    images/sam                     (N_img, C, 64, 64)   float16  chunk (1, C, 64, 64)
    images/original_size          (N_img, 2)  int32  (h, w)      chunk (B, 2)
    images/input_size             (N_img, 2)  int32  (h, w)      chunk (B, 2)
    images/failed                 (N_img,)    uint8  0 ok, else FAILURE_REASONS code, chunk (B,)
    images/first_query            (N_img,)    int64  first row of the image's queries
    queries/text_l{L}             (N_q, T, d) float16  right-padded with zeros, chunk (1, T, d)
    queries/text_len              (N_q,)      int32  L_t of each query; 0: its text was refused (skipped)
    queries/image_index           (N_q,)      int64  image of each query
    queries/failed                (N_q,)      uint8  0 ok, else why (its image's code, or bad_text), at completion
    blocks/done                   (N_blocks,) uint8  1 once block b is written, chunk (1,)

    images/sam_crc32, images/mllm_l{L}_crc32   (N_img,)       uint32  crc32 of each sample, chunk (B,)
    queries/text_l{L}_crc32       (N_blocks, Q)  uint32  row b: crc32 of block b's queries, chunk (1, Q)
    blocks/crc32                  (N_blocks,)    uint32  crc32 of block b's sizes and failure codes, chunk (1,)

Integrity (format version 2): every sample's checksum is the crc32 of its float16 bytes
as written (a text row with its zero padding; after bit-rounding, so it is what reads
back), computed by the writer of its block and written with the block's sizes, before
its done flag. ``Q`` (``checksums.block_queries``) is the most queries of any block, so
the checksums of a block's queries are one chunk owned by the block's writer. The index
arrays' checksums sit in ``attrs["checksums"]["index"]``. Readers check each sample as
they read it, and ``manifest.parquet`` against ``manifest_hash`` on first use; a missing
chunk (zarr would read zeros), a changed one or one that does not decode is a one-line
:class:`DamagedStoreError` naming the sample and the repair: the same ``lens-cache build``
command, which recomputes exactly the damaged blocks (:func:`scan_store`). Version-1
stores carry no checksums: their values are read unchecked.

Why this shape:

* Per-sample chunks, no sharding: a worker owns whole chunks, so concurrent writers
  never share one (two writers in one shard lose data).
* Block-level arrays (sizes, failures) are chunked by ``block_size``, so a block
  (``B`` consecutive images and all their queries) is owned by exactly one writer.
* ``blocks/done[b]`` is written after the block's data and ``complete`` after every
  flag: a reader never takes a half-written sample as finished.
* Arrays are created once, by the parent; workers open the group ``r+`` and never
  resize anything.
* The warm-start file is written once, atomically, before any block; its record
  (layers, sha256, the head sizes it fits) is ``identity["warm_start"]``, so the file
  is part of what identifies the store, and a reader checks the hash before using it.

Format version 2 added ``sam_channels``, the warm start (for the first layer only, keys
``layers.0.*``/``layers.1.*``) and the checksums; a version-1 store reads as ``C = 256``
without a warm start and without checksum checks. Version 3 keeps the warm start of every
cached layer (``by_layer``; keys ``decoder.<i>.*``, each decoder layer once); a version-2
store still warm-starts its first layer.

Skipped samples (one bad sample never stops a build): an image that is missing,
unreadable, of another size than the manifest says, or of a shape SAM's frame cannot
take has its ``FAILURE_REASONS`` code in ``images/failed`` and no features; a query whose
text the backbone refuses (a special token such as ``<image>`` in it, a prompt longer
than the MLLM's context) has ``text_len`` 0 and code ``bad_text`` in ``queries/failed``;
an image none of whose queries is usable is skipped as ``bad_text`` too. Readers serve
:meth:`FeatureStore.valid_query_ids` only; ``lens-cache info`` and ``verify`` list the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from lens_cache.errors import UsageError, UserError
from lens_cache.files import replaced_on_success
from lens_cache.identity import feature_differences, format_differences, identity_hash, normalise_json
from zarr.abc.store import Store as ZarrStore
from zarr.codecs import ZstdCodec

FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
ATTRS_KEY = "lens_cache"
#: Written first at creation and replaced (atomically, in one metadata write) by
#: ``ATTRS_KEY`` once every array exists: a store killed while being created is
#: recognisable as ours and safely recreated.
PARTIAL_KEY = "lens_cache_partial"
MANIFEST_FILE = "manifest.parquet"
STORAGE_DTYPE = "float16"
COMPRESSIONS = ("lossless", "bitround", "none")
ZSTD_LEVEL = 3
BITROUND_KEEPBITS = 7
#: SAM's image embedding is (C, 64, 64) whatever the variant; C is its prompt width.
SAM_EMBEDDING_SIZE = 64
#: C of the real SAMs, and of every store of format version 1 (which did not record it).
DEFAULT_SAM_CHANNELS = 256
#: The MLLM's decoder layers for the head's warm start (``decoder.<i>.*``; version 2: ``layers.0/1.*``).
WARM_START_FILE = "warm_start/decoder_layers.safetensors"
#: 1-D bookkeeping arrays written once by the parent: big chunks, few objects.
INDEX_CHUNK = 1 << 16

#: ``images/failed`` codes: why an image was skipped (0 = loaded fine).
FAILURE_REASONS = {1: "missing", 2: "unreadable", 3: "size_mismatch", 4: "bad_geometry", 5: "bad_text"}
#: the code of a query (or of an image with no usable query) whose text the backbone refused
BAD_TEXT = 5
#: Per-sample checksums (format version 2): ``zlib.crc32`` of the sample's bytes as written.
CHECKSUM_ALGORITHM = "crc32"
CHECKSUM_SUFFIX = "_crc32"
BLOCK_CHECKSUM_ARRAY = "blocks/crc32"
#: Arrays written once by the parent at creation, their checksums in ``attrs["checksums"]["index"]``.
INDEX_ARRAYS = ("images/first_query", "queries/image_index", "queries/text_len")
#: Threads that read and check samples in :func:`scan_store` (decoding and crc32 release the GIL).
SCAN_THREADS = 4


class StoreError(UserError):
    """A store is missing, foreign, incomplete, or not the one a build/reader expects.

    The message is one line meant for the user (the CLI prints it as is).
    """


class DamagedStoreError(StoreError):
    """A sample (or index array, or the manifest) of a store is not what was written.

    ``detail`` is the short form (``image 3: images/sam: its chunk is missing``) that
    :func:`scan_store` lists; the message adds the store and the repair.
    """

    def __init__(self, message: str, *, detail: str = "", block: int | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message
        self.block = block


class MissingLayerError(StoreError, ValueError):
    """The features of the layer a reader needs are not there: a store that does not cache it, or a
    live backbone that does not compute it (:func:`require_layer`; still a ValueError for callers)."""


def require_layer(layers: Sequence[int], layer: int, *, holder: str, fix: str = "") -> None:
    """Refuse to read ``layer`` from features that lack it: the one layer check of every reader.

    Args:
        layers: the layers ``holder`` has (a store's cached layers, a live backbone's).
        holder: what holds them, for the message (``store PATH``, ``the live backbone``).
        fix: what to do instead, appended after a colon.
    Raises:
        MissingLayerError: ``{holder} caches layer(s) [a, b], not {layer}: {fix}`` (one line).
    """
    if int(layer) in {int(have) for have in layers}:
        return
    message = f"{holder} caches layer(s) {sorted(int(have) for have in layers)}, not {int(layer)}"
    raise MissingLayerError(f"{message}: {fix}" if fix else message)


# ----------------------------------------------------------------------------- naming


def image_array_name(layer: int) -> str:
    """Array of the MLLM image-token states of ``layer``: (N_img, 576, d)."""
    return f"images/mllm_l{layer}"


def text_array_name(layer: int) -> str:
    """Array of the text-token states of ``layer``: (N_q, max_text_len, d)."""
    return f"queries/text_l{layer}"


def checksum_array_name(name: str) -> str:
    """Array of the per-sample checksums of the feature array ``name`` (``images/sam`` -> ``images/sam_crc32``)."""
    return f"{name}{CHECKSUM_SUFFIX}"


def sample_arrays(layers: Sequence[int]) -> list[str]:
    """The per-sample feature arrays of a store: the SAM embeddings, then image and text states per layer."""
    names = ["images/sam"]
    for layer in layers:
        names += [image_array_name(layer), text_array_name(layer)]
    return names


def sample_checksum(values: np.ndarray) -> int:
    """crc32 of one sample's little-endian bytes (C order)."""
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return zlib.crc32(values.data)


def block_checksum(original_size: np.ndarray, input_size: np.ndarray, failed: np.ndarray) -> int:
    """crc32 of a block's (n, 2) int32 sizes and (n,) uint8 failure codes, as written."""
    crc = 0
    for values, dtype in ((original_size, "<i4"), (input_size, "<i4"), (failed, "u1")):
        crc = zlib.crc32(np.ascontiguousarray(values, dtype=dtype).data, crc)
    return crc


def stored_checksums(attrs: dict) -> dict | None:
    """``attrs["checksums"]`` (algorithm, block_queries, index), or None for a version-1 store."""
    return attrs.get("checksums")


def sam_embedding_shape(channels: int) -> tuple[int, int, int]:
    """(C, 64, 64): one cached SAM image embedding, C = 256 for SAM, 64 for the toy SAM."""
    return (channels, SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE)


def to_float16(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A feature tensor as a float16 numpy array of ``shape`` (the stored dtype); non-finite values are refused.

    The cache builder stores every feature through it, and ``lens-segment`` rounds live features
    with it, so both see the same float16 values.

    float16 tops out at 65504: a backbone with larger activations would poison
    training with inf, so it fails here, loudly, instead.
    """
    if hasattr(value, "detach"):  # a torch tensor (bf16/fp32, any device)
        import torch  # already loaded by whoever made the tensor; this module does not need it otherwise

        # convert on the device: half the bytes to copy; bf16 -> fp16 rounds like via fp32
        result = value.detach().to(dtype=torch.float16).cpu().numpy()
    else:
        result = np.asarray(value).astype(np.float16)
    if result.shape != shape:
        raise RuntimeError(f"backbone returned {what} of shape {result.shape}, expected {shape}")
    if not np.isfinite(result).all():
        raise RuntimeError(f"{what} has values that are not finite in float16 (|x| > 65504 or NaN)")
    return result


def stored_sam_channels(attrs: dict) -> int:
    """C of a store's SAM embeddings, from its attributes (format version 1: always 256)."""
    return int(attrs.get("sam_channels", DEFAULT_SAM_CHANNELS))


def lens_version() -> str:
    """``lens-seg <version>`` of the installed project (recorded as ``created_by``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lens-seg {version('lens-seg')}"
    except PackageNotFoundError:
        return "lens-seg (not installed)"


# ----------------------------------------------------------------------------- location


@dataclass(frozen=True)
class StoreLocation:
    """Where a store lives: a local path, ``file://`` URL, or any fsspec URL.

    Local stores go through zarr's ``LocalStore`` (it writes every object to a
    temporary file and renames it, so a SIGKILL never leaves a torn chunk or a torn
    ``zarr.json``); other URLs through ``FsspecStore`` (object stores replace whole
    objects on PUT).
    """

    url: str
    storage_options: dict = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    @property
    def local_path(self) -> Path:
        return Path(self.url.removeprefix("file://")).expanduser().absolute()

    def zarr_store(self, *, read_only: bool) -> ZarrStore:
        if self.is_local:
            return zarr.storage.LocalStore(self.local_path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=read_only
        )

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and the store's root path on it."""
        if self.is_local:
            return fsspec.filesystem("file"), str(self.local_path)
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, root.rstrip("/")

    def exists(self) -> bool:
        """True when anything is stored at this location."""
        fs, root = self.filesystem()
        return fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root)))

    def remove(self) -> None:
        fs, root = self.filesystem()
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` under the store root (temporary name + rename where local)."""
        fs, root = self.filesystem()
        path = f"{root}/{name}"
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with replaced_on_success(path) as tmp:  # removed if the write fails
                tmp.write_bytes(data)
        else:
            fs.pipe_file(path, data)

    def read_bytes(self, name: str) -> bytes:
        fs, root = self.filesystem()
        return fs.cat_file(f"{root}/{name}")

    def bytes_under(self, name: str) -> int:
        """Bytes stored under ``name`` (an array folder), as the filesystem counts them."""
        fs, root = self.filesystem()
        path = f"{root}/{name}"
        return int(fs.du(path, total=True)) if fs.exists(path) else 0


def open_group(location: StoreLocation, mode: str) -> zarr.Group:
    """The store's root group (``mode`` as in :func:`zarr.open_group`)."""
    with quiet_numcodecs():
        return zarr.open_group(store=location.zarr_store(read_only=mode == "r"), mode=mode)


class quiet_numcodecs(warnings.catch_warnings):
    """Silence zarr's note that numcodecs codecs (BitRound) are outside the v3 spec.

    The note is true and recorded in the store attrs (``compression``); repeating it
    on every open of a bit-rounded store only clutters the logs.
    """

    def __enter__(self) -> Any:
        result = super().__enter__()
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        return result


# ----------------------------------------------------------------------------- codecs


def feature_codecs(compression: str) -> dict[str, Any]:
    """``filters``/``compressors`` for the float16 feature arrays.

    ``lossless``: zstd (which saves only ~8% on float16 activations).
    ``bitround``: keep 7 of float16's 10 mantissa bits, then zstd (~1.3x).
    ``none``: raw bytes (fastest to write and read).
    """
    if compression == "lossless":
        return {"filters": None, "compressors": [ZstdCodec(level=ZSTD_LEVEL)]}
    if compression == "bitround":
        from zarr.codecs.numcodecs import BitRound

        with quiet_numcodecs():
            return {"filters": [BitRound(keepbits=BITROUND_KEEPBITS)], "compressors": [ZstdCodec(level=ZSTD_LEVEL)]}
    if compression == "none":
        return {"filters": None, "compressors": None}
    raise UsageError(f"unknown compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")


# ----------------------------------------------------------------------------- manifest


def manifest_hash(table: pa.Table) -> str:
    """The manifest's content hash (``lens_manifests.manifest_hash``)."""
    from lens_manifests import manifest_hash as _manifest_hash

    return _manifest_hash(table)


def manifest_to_parquet_bytes(table: pa.Table, *, spec: str) -> bytes:
    """The manifest as a file ``lens_manifests.read_manifest`` accepts (version + hash stamped)."""
    import tempfile

    from lens_manifests import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST_FILE
        write_manifest(table, path, spec=spec)
        return path.read_bytes()


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
        start = block * self.block_size
        return range(start, min(start + self.block_size, self.num_images))

    def query_range(self, block: int) -> range:
        images = self.image_range(block)
        return range(int(self.first_query[images.start]), self.query_end(images.stop - 1))

    def query_end(self, image: int) -> int:
        """One past the last row of ``image``."""
        return int(self.first_query[image + 1]) if image + 1 < self.num_images else self.num_queries

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


# ----------------------------------------------------------------------------- creation


@dataclass(frozen=True)
class StoreDescription:
    """What a store is (the ``lens_cache`` attribute minus the bookkeeping)."""

    identity: dict
    layers: tuple[int, ...]
    hidden_size: int
    num_image_tokens: int
    sam_channels: int
    spec: str
    manifest_hash: str
    block_size: int
    compression: str

    def comparable(self) -> dict[str, Any]:
        """The settings a resumed build must share with the store, flattened for messages."""
        identity = {key: value for key, value in normalise_json(self.identity).items() if key != "layers"}
        return {
            "layers": list(self.layers),
            **identity,
            "block_size": self.block_size,
            "compression": self.compression,
        }


def create_store(
    location: StoreLocation,
    *,
    description: StoreDescription,
    manifest: pa.Table,
    plan: ImagePlan,
    text_len: np.ndarray,
) -> None:
    """Create every array of a new store (the parent does this once, before any worker).

    Args:
        location: where; must be empty (the caller removes an old store first).
        description: identity, layers, sizes, spec, manifest hash, block size, compression.
        manifest: the manifest table, stored beside the arrays.
        plan: rows grouped into images and blocks.
        text_len: (N_q,) int, L_t of every query (by tokenisation, known up front).
    """
    feature_codecs(description.compression)  # a bad name raises its one-line error here
    num_images, num_queries, d = plan.num_images, plan.num_queries, description.hidden_size
    text_len = np.asarray(text_len, dtype=np.int32)
    if text_len.shape != (num_queries,) or text_len.min() < 0:
        raise ValueError("text_len must give a length for every query (0: a refused text)")
    max_text_len = max(1, int(text_len.max()))

    group = open_group(location, mode="w")
    group.attrs.put({PARTIAL_KEY: {"format_version": FORMAT_VERSION}})
    location.write_bytes(MANIFEST_FILE, manifest_to_parquet_bytes(manifest, spec=description.spec))

    features = feature_codecs(description.compression)
    small = {"compressors": [ZstdCodec(level=ZSTD_LEVEL)], "filters": None, "fill_value": 0}
    with quiet_numcodecs():
        for layer in description.layers:
            group.create_array(
                image_array_name(layer),
                shape=(num_images, description.num_image_tokens, d),
                chunks=(1, description.num_image_tokens, d),
                dtype=STORAGE_DTYPE,
                fill_value=0,
                **features,
            )
            group.create_array(
                text_array_name(layer),
                shape=(num_queries, max_text_len, d),
                chunks=(1, max_text_len, d),
                dtype=STORAGE_DTYPE,
                fill_value=0,
                **features,
            )
        sam_shape = sam_embedding_shape(description.sam_channels)
        group.create_array(
            "images/sam",
            shape=(num_images, *sam_shape),
            chunks=(1, *sam_shape),
            dtype=STORAGE_DTYPE,
            fill_value=0,
            **features,
        )
    block = plan.block_size
    for name in ("images/original_size", "images/input_size"):
        group.create_array(name, shape=(num_images, 2), chunks=(block, 2), dtype="int32", **small)
    group.create_array("images/failed", shape=(num_images,), chunks=(block,), dtype="uint8", **small)
    group.create_array("blocks/done", shape=(plan.num_blocks,), chunks=(1,), dtype="uint8", **small)
    group.create_array(
        "queries/failed", shape=(num_queries,), chunks=(min(num_queries, INDEX_CHUNK),), dtype="uint8", **small
    )
    # Checksums, chunked so that each block's are written by the block's writer alone.
    block_queries = plan.max_block_queries
    for name in sample_arrays(description.layers):
        if name.startswith("queries/"):
            shape, chunks = (plan.num_blocks, block_queries), (1, block_queries)
        else:
            shape, chunks = (num_images,), (block,)
        group.create_array(checksum_array_name(name), shape=shape, chunks=chunks, dtype="uint32", **small)
    group.create_array(BLOCK_CHECKSUM_ARRAY, shape=(plan.num_blocks,), chunks=(1,), dtype="uint32", **small)

    def write_index(name: str, values: np.ndarray) -> None:
        array = group.create_array(
            name, shape=values.shape, chunks=(min(len(values), INDEX_CHUNK),), dtype=values.dtype, **small
        )
        array[:] = values

    index = index_arrays(plan, text_len)
    for name, values in index.items():
        write_index(name, values)

    # Last step of creation, one metadata write: the store now says what it is.
    group.attrs.put(
        {
            ATTRS_KEY: {
                "format_version": FORMAT_VERSION,
                "identity": normalise_json(description.identity),
                "identity_hash": identity_hash(description.identity),
                "manifest_hash": description.manifest_hash,
                "spec": description.spec,
                "layers": list(description.layers),
                "hidden_size": d,
                "num_image_tokens": description.num_image_tokens,
                "sam_channels": description.sam_channels,
                "num_images": num_images,
                "num_queries": num_queries,
                "num_blocks": plan.num_blocks,
                "max_text_len": max_text_len,
                "storage_dtype": STORAGE_DTYPE,
                "compression": description.compression,
                "block_size": plan.block_size,
                "failure_reasons": {str(code): reason for code, reason in FAILURE_REASONS.items()},
                "checksums": {
                    "algorithm": CHECKSUM_ALGORITHM,
                    "block_queries": block_queries,
                    "index": {name: sample_checksum(values) for name, values in index.items()},
                },
                "num_failed_images": None,
                "created_by": lens_version(),
                "complete": False,
            }
        }
    )


def index_arrays(plan: ImagePlan, text_len: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays the parent writes once at creation (:data:`INDEX_ARRAYS`), as stored."""
    return {
        "images/first_query": plan.first_query.astype(np.int64),
        "queries/image_index": plan.image_index.astype(np.int64),
        "queries/text_len": np.asarray(text_len, dtype=np.int32),
    }


def store_state(location: StoreLocation) -> str:
    """``absent``, ``partial`` (killed while being created), ``lens`` or ``foreign``."""
    if not location.exists():
        return "absent"
    try:
        attrs = open_group(location, mode="r").attrs.asdict()
    except (zarr.errors.BaseZarrError, FileNotFoundError, ValueError, KeyError):
        # zarr raises its own error types for "not a group" (NodeTypeValidationError
        # is a ValueError, GroupNotFoundError a FileNotFoundError).
        return "foreign"
    if ATTRS_KEY in attrs:
        return "lens"
    return "partial" if PARTIAL_KEY in attrs else "foreign"


# ----------------------------------------------------------------------------- reader


class FeatureStore:
    """A finished (or, on request, unfinished) feature store, opened for reading.

    Stage 2 reads it through :meth:`read_query` / :meth:`read_image`; the build opens
    it ``r+`` to write blocks. Pickles as its URL (each DataLoader worker reopens it).
    """

    def __init__(self, location: StoreLocation, group: zarr.Group, attrs: dict) -> None:
        self.location = location
        self._group = group
        self._attrs = attrs
        self._arrays: dict[str, zarr.Array] = {}
        self._block_checksum_cache: dict[int, dict[str, np.ndarray]] = {}

    # -- opening ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str | Path,
        *,
        require_complete: bool = True,
        storage_options: dict | None = None,
    ) -> FeatureStore:
        """Open the store at ``url`` (local path or fsspec URL).

        Raises:
            StoreError: missing, not a lens cache, unsupported format version, or
                (with ``require_complete``) not finished.
        """
        location = StoreLocation(str(url), dict(storage_options or {}))
        state = store_state(location)
        if state == "absent":
            raise StoreError(f"no feature store at {url}: build it with `lens-cache build ... --out {url}`")
        if state == "foreign":
            raise StoreError(f"{url} is not a lens feature store (no '{ATTRS_KEY}' attributes)")
        if state == "partial":
            raise StoreError(f"store {url} was killed while being created: rerun the same `lens-cache build` command")
        group = open_group(location, mode="r")
        attrs = dict(group.attrs[ATTRS_KEY])
        version = attrs.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise StoreError(
                f"store {url} has cache format version {version}; this lens reads version(s) "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}: rebuild it or use a matching lens"
            )
        store = cls(location, group, attrs)
        if require_complete and not attrs.get("complete", False):
            done = store.num_blocks - len(store.missing_blocks())
            raise StoreError(
                f"store {url} is incomplete ({done}/{store.num_blocks} blocks): "
                "rerun the same `lens-cache build` command to finish it"
            )
        return store

    def __reduce__(self) -> tuple:
        return (_reopen, (self.location.url, self.location.storage_options))

    def __repr__(self) -> str:
        return (
            f"FeatureStore({self.url!r}, images={self.num_images}, queries={self.num_queries}, "
            f"layers={list(self.layers)}, complete={self.complete})"
        )

    # -- self-description -------------------------------------------------------

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

    @cached_property
    def manifest(self) -> pa.Table:
        """The manifest the store was built from (``manifest.parquet`` beside the arrays).

        Checked against the recorded ``manifest_hash`` on first use.

        Raises:
            DamagedStoreError: the file is missing, unreadable or not the one the store was built from.
        """
        try:
            table = self.unchecked_manifest()
            digest = manifest_hash(table)
        except (OSError, pa.ArrowException) as error:
            raise DamagedStoreError(
                f"store {self.url}: {MANIFEST_FILE} is unreadable ({type(error).__name__}: {error}): {self.repair_hint}"
            ) from None
        if digest != self.manifest_hash:
            raise DamagedStoreError(
                f"store {self.url}: {MANIFEST_FILE} has hash {digest[:12]}, the store was built from "
                f"{self.manifest_hash[:12]} (the file was changed): {self.repair_hint}"
            )
        return table

    def unchecked_manifest(self) -> pa.Table:
        """``manifest.parquet`` as stored, not checked against the recorded hash (for verify)."""
        return pq.read_table(io.BytesIO(self.location.read_bytes(MANIFEST_FILE)))

    @property
    def repair_hint(self) -> str:
        """What repairs a damaged store: the build command, which recomputes only what is damaged."""
        return (
            f"repair it by rerunning the `lens-cache build ... --out {self.url}` command that made it "
            "(it recomputes only the damaged blocks)"
        )

    @property
    def warm_start(self) -> dict:
        """What the store holds for the head's warm start (``identity["warm_start"]``).

        ``{"file", "sha256", "head": {hidden_size, num_heads, mlp_size, ...}, "by_layer": {"k": [k, k + 1]
        or None}, "layers": the first layer's pair}`` (format 2: no ``by_layer``, the first layer
        only), or ``{"layers": None, "reason": ...}`` when the build wrote no file.
        """
        return self.identity.get("warm_start") or {"layers": None, "reason": "the store predates warm-start export"}

    def warm_start_bytes(self) -> bytes | None:
        """The warm-start file, checked against the sha256 the store recorded; None when there is none.

        Raises:
            StoreError: the file is missing, or its bytes are not the ones the store was built with.
        """
        record = self.warm_start
        if record.get("sha256") is None:
            return None
        fix = "rebuild the store (the same `lens-cache build` command with --overwrite)"
        try:
            data = self.location.read_bytes(WARM_START_FILE)
        except FileNotFoundError:
            raise StoreError(f"store {self.url} lacks {WARM_START_FILE}, which its identity records: {fix}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != record["sha256"]:
            raise StoreError(
                f"store {self.url}: {WARM_START_FILE} has sha256 {digest[:12]}, the store recorded "
                f"{record['sha256'][:12]} (the file was changed): {fix}"
            )
        return data

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

    # -- arrays -----------------------------------------------------------------

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
        for folder in ("blocks", "images", "queries"):
            with quiet_numcodecs():
                names += [f"{folder}/{name}" for name in self._group[folder].array_keys()]
        return sorted(names)

    @cached_property
    def text_len(self) -> np.ndarray:
        """(N_q,) int32: L_t of every query."""
        return self.checked_index_array("queries/text_len")

    @cached_property
    def image_index(self) -> np.ndarray:
        """(N_q,) int64: the image of every query."""
        return self.checked_index_array("queries/image_index")

    @cached_property
    def first_query(self) -> np.ndarray:
        """(N_img,) int64: the first query of every image."""
        return self.checked_index_array("images/first_query")

    @property
    def checksums(self) -> dict | None:
        """``attrs["checksums"]``; None for a version-1 store (no checksums: values read unchecked)."""
        return stored_checksums(self._attrs)

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
    def _original_size(self) -> np.ndarray:
        return self._read_whole("images/original_size")

    @cached_property
    def _input_size(self) -> np.ndarray:
        return self._read_whole("images/input_size")

    @cached_property
    def image_failures(self) -> np.ndarray:
        """(N_img,) uint8: 0 = cached, else a ``FAILURE_REASONS`` code (image skipped)."""
        return self._read_whole("images/failed")

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

    def query_failures(self) -> np.ndarray:
        """(N_q,) uint8: 0 = cached, else why the query is skipped: its image's code, or
        ``bad_text`` when the backbone refused its text (``text_len`` 0)."""
        codes = self.image_failures[self.image_index]
        return np.where((codes == 0) & (self.text_len == 0), BAD_TEXT, codes).astype(np.uint8)

    def failed_queries(self) -> list[dict[str, Any]]:
        """The queries whose text the build refused (their image was cached): query_id, image_index,
        image_id, text, reason. Queries of skipped images are covered by :meth:`failed_images`."""
        refused = np.flatnonzero((self.text_len == 0) & (self.image_failures[self.image_index] == 0))
        if len(refused) == 0:
            return []
        manifest = self.unchecked_manifest()
        texts = manifest.column("text").take(refused).to_pylist()
        image_ids = manifest.column("image_id").take(refused).to_pylist()
        return [
            {"query_id": int(q), "image_index": int(self.image_index[q]), "image_id": image_id, "text": text,
             "reason": FAILURE_REASONS[BAD_TEXT]}
            for q, image_id, text in zip(refused, image_ids, texts, strict=True)
        ]

    def failed_images(self) -> list[dict[str, Any]]:
        """The images the build skipped: image_index, image_id, image_path, reason."""
        failed = np.flatnonzero(self.image_failures)
        if len(failed) == 0:
            return []
        rows = self.first_query[failed]
        manifest = self.unchecked_manifest()  # informational: verify reports a changed manifest itself
        image_ids = manifest.column("image_id").take(rows).to_pylist()
        paths = manifest.column("image_path").take(rows).to_pylist()
        return [
            {
                "image_index": int(image),
                "image_id": image_id,
                "image_path": path,
                "reason": FAILURE_REASONS.get(int(self.image_failures[image]), "unknown"),
            }
            for image, image_id, path in zip(failed, image_ids, paths, strict=True)
        ]

    def valid_query_ids(self) -> np.ndarray:
        """(n,) int64: the queries that were cached, image and text (stage 2 trains on these)."""
        return np.flatnonzero(self.query_failures() == 0).astype(np.int64)

    # -- blocks -----------------------------------------------------------------

    def block_image_range(self, block: int) -> range:
        start = block * self.block_size
        return range(start, min(start + self.block_size, self.num_images))

    def done_flags(self) -> np.ndarray:
        """(N_blocks,) bool: which blocks are written (read fresh every call)."""
        return self.array("blocks/done")[:] == 1

    def is_block_done(self, block: int) -> bool:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range (store has {self.num_blocks})")
        return bool(self.array("blocks/done")[block] == 1)

    def missing_blocks(self) -> list[int]:
        return [int(block) for block in np.flatnonzero(~self.done_flags())]

    # -- integrity ----------------------------------------------------------------

    def _damaged(self, what: str, block: int, problem: str) -> DamagedStoreError:
        return DamagedStoreError(
            f"store {self.url}: {what} is damaged ({problem}): {self.repair_hint}",
            detail=f"{what}: {problem}",
            block=block,
        )

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
        images = self.block_image_range(block)
        queries = range(int(self.first_query[images.start]), self._query_end(images.stop - 1))
        what = f"block {block} (images {images.start}-{images.stop - 1})"
        rows: dict[str, np.ndarray] = {}
        for name in sample_arrays(self.layers):
            if name.startswith("queries/"):
                rows[name] = self._read_rows(checksum_array_name(name), block, what, block)[: len(queries)]
            else:
                rows[name] = self._read_rows(checksum_array_name(name), slice(images.start, images.stop), what, block)
        recorded = int(self._read_rows(BLOCK_CHECKSUM_ARRAY, block, what, block))
        actual = block_checksum(
            self._read_rows("images/original_size", slice(images.start, images.stop), what, block),
            self._read_rows("images/input_size", slice(images.start, images.stop), what, block),
            self._read_rows("images/failed", slice(images.start, images.stop), what, block),
        )
        if actual != recorded:
            raise self._damaged(what, block, "its image sizes or failure codes changed (checksum mismatch)")
        self._block_checksum_cache[block] = rows
        return rows

    def _query_end(self, image: int) -> int:
        return int(self.first_query[image + 1]) if image + 1 < self.num_images else self.num_queries

    def read_sample(self, name: str, row: int) -> np.ndarray:
        """Row ``row`` of the per-sample array ``name`` (an image, or a query's padded text row), checked.

        Raises:
            DamagedStoreError: its chunk is missing, does not decode, or holds other bytes than were written.
        """
        if name.startswith("queries/"):
            image = int(self.image_index[row])
            what = f"query {row} (image {image})"
        else:
            image, what = row, f"image {row}"
        block = image // self.block_size
        values = self._read_rows(name, row, what, block)
        checksums = self.block_checksums(block)
        if checksums is None:  # format version 1: no checksums
            return values
        if name.startswith("queries/"):
            recorded = int(checksums[name][row - int(self.first_query[block * self.block_size])])
        else:
            recorded = int(checksums[name][row - block * self.block_size])
        if sample_checksum(values) != recorded:
            if not self.chunk_exists(name, row):
                raise self._damaged(what, block, f"{name}: its chunk is missing")
            raise self._damaged(what, block, f"{name}: checksum mismatch, its bytes changed")
        return values

    def check_block(self, block: int) -> list[str]:
        """Read every sample of ``block`` and check it; the problems found (empty: intact)."""
        try:
            self.block_checksums(block)
        except DamagedStoreError as error:
            return [error.detail]
        problems = []
        images = self.block_image_range(block)
        queries = range(int(self.first_query[images.start]), self._query_end(images.stop - 1))
        for name in sample_arrays(self.layers):
            for row in queries if name.startswith("queries/") else images:
                try:
                    self.read_sample(name, row)
                except DamagedStoreError as error:
                    problems.append(error.detail)
        return problems

    # -- reading samples ----------------------------------------------------------

    def _check_image(self, image: int) -> None:
        if not 0 <= image < self.num_images:
            raise IndexError(f"image {image} out of range (store has {self.num_images})")
        code = int(self.image_failures[image])
        if code:
            reason = FAILURE_REASONS.get(code, "unknown")
            raise StoreError(
                f"image {image} of store {self.url} was skipped at build time ({reason}); "
                "iterate over store.valid_query_ids() instead"
            )

    def read_image(self, image: int, layer: int) -> dict[str, Any]:
        """Everything cached for one image.

        Returns:
            image_states: (576, d) float16, the MLLM's image-token states at ``layer``.
            sam_embedding: (C, 64, 64) float16, C = :attr:`sam_channels` (256 for SAM, 64 for the toy SAM).
            original_size: (2,) int (h, w); input_size: (2,) int (h, w) before padding.
            image_index: int; query_ids: (n,) int64, the image's queries.
        """
        require_layer(self.layers, layer, holder=f"store {self.url}")
        self._check_image(image)
        first = int(self.first_query[image])
        end = int(self.first_query[image + 1]) if image + 1 < self.num_images else self.num_queries
        return {
            "image_states": self.read_sample(image_array_name(layer), image),
            "sam_embedding": self.read_sample("images/sam", image),
            "original_size": self._original_size[image].astype(np.int64),
            "input_size": self._input_size[image].astype(np.int64),
            "image_index": int(image),
            "query_ids": np.arange(first, end, dtype=np.int64),
        }

    def read_query(self, query: int, layer: int) -> dict[str, Any]:
        """Everything stage 2 needs for one query.

        Returns:
            image_states: (576, d) float16; text_states: (L_t, d) float16 (the last
            row is the start-of-answer token); sam_embedding: (C, 64, 64) float16;
            original_size, input_size: (2,) int (h, w); image_index: int; query_id: int.
        """
        if not 0 <= query < self.num_queries:
            raise IndexError(f"query {query} out of range (store has {self.num_queries})")
        image = int(self.image_index[query])
        if int(self.text_len[query]) == 0 and not self.image_failures[image]:
            raise StoreError(
                f"query {query} of store {self.url} was skipped at build time ({FAILURE_REASONS[BAD_TEXT]}); "
                "iterate over store.valid_query_ids() instead"
            )
        sample = self.read_image(image, layer)
        del sample["query_ids"]
        sample["text_states"] = self.read_sample(text_array_name(layer), query)[: int(self.text_len[query])]
        sample["query_id"] = int(query)
        return sample


def _reopen(url: str, storage_options: dict) -> FeatureStore:
    return FeatureStore.open(url, require_complete=False, storage_options=storage_options)


def check_compatible(stores: Sequence[FeatureStore]) -> None:
    """Refuse to mix stores whose features differ (:func:`lens_cache.identity.feature_differences`).

    Manifests may differ, and so may the cached layer sets: whether the layer a run reads
    is in every store is checked on its own (:func:`require_layer`).

    Raises:
        StoreError: naming the first two stores that differ and how.
    """
    if not stores:
        return
    reference = stores[0]
    for other in stores[1:]:
        differences = feature_differences(reference.identity, other.identity)
        if differences:
            raise StoreError(
                f"stores {reference.url} and {other.url} were cached with different backbones "
                f"({format_differences(differences)}): they cannot be mixed"
            )


# ----------------------------------------------------------------------------- verification


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
        yield "OK" if self.ok else f"NOT OK ({len(self.problems)} problem(s))"


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


def expected_arrays(attrs: dict) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """Array name -> (shape, dtype, chunk shape) that the attributes promise."""
    n_img, n_q, d = attrs["num_images"], attrs["num_queries"], attrs["hidden_size"]
    t, tokens, block = attrs["max_text_len"], attrs["num_image_tokens"], attrs["block_size"]
    arrays: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]] = {}
    for layer in attrs["layers"]:
        arrays[image_array_name(layer)] = ((n_img, tokens, d), STORAGE_DTYPE, (1, tokens, d))
        arrays[text_array_name(layer)] = ((n_q, t, d), STORAGE_DTYPE, (1, t, d))
    sam_shape = sam_embedding_shape(stored_sam_channels(attrs))
    arrays["images/sam"] = ((n_img, *sam_shape), STORAGE_DTYPE, (1, *sam_shape))
    arrays["images/original_size"] = ((n_img, 2), "int32", (block, 2))
    arrays["images/input_size"] = ((n_img, 2), "int32", (block, 2))
    arrays["images/failed"] = ((n_img,), "uint8", (block,))
    arrays["images/first_query"] = ((n_img,), "int64", (min(n_img, INDEX_CHUNK),))
    arrays["queries/text_len"] = ((n_q,), "int32", (min(n_q, INDEX_CHUNK),))
    arrays["queries/image_index"] = ((n_q,), "int64", (min(n_q, INDEX_CHUNK),))
    arrays["queries/failed"] = ((n_q,), "uint8", (min(n_q, INDEX_CHUNK),))
    arrays["blocks/done"] = ((attrs["num_blocks"],), "uint8", (1,))
    checksums = stored_checksums(attrs)
    if checksums is not None:
        width = checksums["block_queries"]
        for name in sample_arrays(attrs["layers"]):
            if name.startswith("queries/"):
                arrays[checksum_array_name(name)] = ((attrs["num_blocks"], width), "uint32", (1, width))
            else:
                arrays[checksum_array_name(name)] = ((n_img,), "uint32", (block,))
        arrays[BLOCK_CHECKSUM_ARRAY] = ((attrs["num_blocks"],), "uint32", (1,))
    return arrays


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
        images = store.image_index[sorted(rows)] if name.startswith("queries/") else np.asarray(sorted(rows))
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
    names = [("images/sam", expected_images)]
    for layer in store.layers:
        names += [(image_array_name(layer), expected_images), (text_array_name(layer), expected_queries)]
    for name, expected in names:
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
        images = store.block_image_range(block)
        sizes[block] = (len(images), store._query_end(images.stop - 1) - int(store.first_query[images.start]))
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
    for name in INDEX_ARRAYS:
        try:
            store.checked_index_array(name)
        except DamagedStoreError as error:
            report.problems.append(error.detail)
            index_ok = False
    if not index_ok:
        report.problems.append(f"the store's index arrays are damaged: {store.repair_hint}")
        return report
    try:
        report.problems += check_filled(store)
        if store.complete and not np.array_equal(store.array("queries/failed")[:], store.query_failures()):
            report.problems.append("queries/failed disagrees with images/failed and queries/text_len")
        report.failed_images = store.failed_images()
        report.failed_queries = store.failed_queries()
    except DamagedStoreError as error:
        report.problems.append(error.detail)
    if quick:
        report.notes.append("--quick: values not read (run without --quick to check every sample)")
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
