"""The feature store: the versioned, self-describing contract between stage 1 and stage 2.

One Zarr v3 group holds the features of one (dataset split, backbone, layer set,
prompt template). Everything that made it what it is sits in the group attribute
``lens_cache`` (pinned by ``tests/test_cache_store.py``), the manifest it was built from sits beside
the arrays as ``manifest.parquet``, and a reader refuses a store that is not
finished or not what it expects.

Layout (``N_img`` images, ``N_q`` queries, ``d`` hidden size, ``T`` = max_text_len,
``B`` = block_size; "chunk" is the chunk shape)::

    zarr.json                      attrs["lens_cache"]: format_version, identity, ... complete
    manifest.parquet               the manifest (one row per query, query_id == row)
    images/mllm_l{L}               (N_img, 576, d)      float16  chunk (1, 576, d)
    images/sam                     (N_img, 256, 64, 64) float16  chunk (1, 256, 64, 64)
    images/original_size          (N_img, 2)  int32  (h, w)      chunk (B, 2)
    images/input_size             (N_img, 2)  int32  (h, w)      chunk (B, 2)
    images/failed                 (N_img,)    uint8  0 ok, else FAILURE_REASONS code, chunk (B,)
    images/first_query            (N_img,)    int64  first row of the image's queries
    queries/text_l{L}             (N_q, T, d) float16  right-padded with zeros, chunk (1, T, d)
    queries/text_len              (N_q,)      int32  L_t of each query
    queries/image_index           (N_q,)      int64  image of each query
    queries/failed                (N_q,)      uint8  copy of images/failed per query (written at completion)
    blocks/done                   (N_blocks,) uint8  1 once block b is written, chunk (1,)

Why this shape:

* Per-sample chunks, no sharding: a worker owns whole chunks, so concurrent writers
  never share one (two writers in one shard lose data, SPEC section 7).
* Block-level arrays (sizes, failures) are chunked by ``block_size``, so a block
  (``B`` consecutive images and all their queries) is owned by exactly one writer.
* ``blocks/done[b]`` is written after the block's data and ``complete`` after every
  flag: a reader never takes a half-written sample as finished.
* Arrays are created once, by the parent; workers open the group ``r+`` and never
  resize anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
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
from zarr.abc.store import Store as ZarrStore
from zarr.codecs import ZstdCodec

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
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
SAM_EMBEDDING_SHAPE = (256, 64, 64)
#: 1-D bookkeeping arrays written once by the parent: big chunks, few objects.
INDEX_CHUNK = 1 << 16

#: ``images/failed`` codes: why an image was skipped (0 = loaded fine).
FAILURE_REASONS = {1: "missing", 2: "unreadable", 3: "size_mismatch"}


class StoreError(Exception):
    """A store is missing, foreign, incomplete, or not the one a build/reader expects.

    The message is one line meant for the user (the CLI prints it as is).
    """


# ----------------------------------------------------------------------------- naming


def image_array_name(layer: int) -> str:
    """Array of the MLLM image-token states of ``layer``: (N_img, 576, d)."""
    return f"images/mllm_l{layer}"


def text_array_name(layer: int) -> str:
    """Array of the text-token states of ``layer``: (N_q, max_text_len, d)."""
    return f"queries/text_l{layer}"


def canonical_json(value: Any) -> str:
    """The JSON text hashed for identities: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def identity_hash(identity: dict) -> str:
    """sha256 (hex) of the canonical JSON of a backbone identity."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def normalise_json(value: Any) -> Any:
    """``value`` as it comes back from JSON attributes (tuples become lists, ...)."""
    return json.loads(canonical_json(value))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``, to name exactly which setting differs."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key in sorted(value):
            flat.update(flatten(value[key], f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def describe_differences(ours: dict, theirs: dict) -> list[tuple[str, Any, Any]]:
    """``(key, ours, theirs)`` for every flattened key whose values differ."""
    flat_ours, flat_theirs = flatten(normalise_json(ours)), flatten(normalise_json(theirs))
    missing = object()
    keys = sorted(set(flat_ours) | set(flat_theirs))
    return [
        (key, flat_ours.get(key, "<unset>"), flat_theirs.get(key, "<unset>"))
        for key in keys
        if flat_ours.get(key, missing) != flat_theirs.get(key, missing)
    ]


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
            tmp = Path(f"{path}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            tmp.replace(path)
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

    ``lossless``: zstd (gains only ~8% on float16 activations, SPEC section 7).
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
    raise ValueError(f"unknown compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")


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


def plan_images(manifest: pa.Table, block_size: int) -> ImagePlan:
    """Group the manifest's rows by image, checking the manifest contract.

    Raises ValueError when ``query_id`` is not the row index or an image's rows are
    not contiguous (both are promises of ``lens_manifests``: a cached row is keyed
    by its manifest index).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if manifest.num_rows == 0:
        raise ValueError("the manifest has no rows: nothing to cache")
    missing = {"dataset", "split", "image_id", "image_path", "query_id", "text", "is_sentence"} - set(
        manifest.column_names
    )
    if missing:
        raise ValueError(f"the manifest lacks column(s) {', '.join(sorted(missing))}")
    query_id = manifest.column("query_id").to_numpy()
    if not np.array_equal(query_id, np.arange(manifest.num_rows)):
        raise ValueError("manifest query_id must equal the row index (0..N-1)")
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
        raise ValueError("manifest rows are not grouped by image (an image's queries must be contiguous)")
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
    if text_len.shape != (num_queries,) or text_len.min() < 1:
        raise ValueError("text_len must give a positive length for every query")
    max_text_len = int(text_len.max())

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
        group.create_array(
            "images/sam",
            shape=(num_images, *SAM_EMBEDDING_SHAPE),
            chunks=(1, *SAM_EMBEDDING_SHAPE),
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

    def write_index(name: str, values: np.ndarray) -> None:
        array = group.create_array(
            name, shape=values.shape, chunks=(min(len(values), INDEX_CHUNK),), dtype=values.dtype, **small
        )
        array[:] = values

    write_index("images/first_query", plan.first_query.astype(np.int64))
    write_index("queries/image_index", plan.image_index.astype(np.int64))
    write_index("queries/text_len", text_len)

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
                "num_images": num_images,
                "num_queries": num_queries,
                "num_blocks": plan.num_blocks,
                "max_text_len": max_text_len,
                "storage_dtype": STORAGE_DTYPE,
                "compression": description.compression,
                "block_size": plan.block_size,
                "failure_reasons": {str(code): reason for code, reason in FAILURE_REASONS.items()},
                "num_failed_images": None,
                "created_by": lens_version(),
                "complete": False,
            }
        }
    )


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
        """The manifest the store was built from (``manifest.parquet`` beside the arrays)."""
        return pq.read_table(io.BytesIO(self.location.read_bytes(MANIFEST_FILE)))

    def description(self) -> StoreDescription:
        return StoreDescription(
            identity=self.identity,
            layers=self.layers,
            hidden_size=self.hidden_size,
            num_image_tokens=self.num_image_tokens,
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
        return self.array("queries/text_len")[:]

    @cached_property
    def image_index(self) -> np.ndarray:
        """(N_q,) int64: the image of every query."""
        return self.array("queries/image_index")[:]

    @cached_property
    def first_query(self) -> np.ndarray:
        """(N_img,) int64: the first query of every image."""
        return self.array("images/first_query")[:]

    @cached_property
    def _original_size(self) -> np.ndarray:
        return self.array("images/original_size")[:]

    @cached_property
    def _input_size(self) -> np.ndarray:
        return self.array("images/input_size")[:]

    @cached_property
    def image_failures(self) -> np.ndarray:
        """(N_img,) uint8: 0 = cached, else a ``FAILURE_REASONS`` code (image skipped)."""
        return self.array("images/failed")[:]

    def failed_images(self) -> list[dict[str, Any]]:
        """The images the build skipped: image_index, image_id, image_path, reason."""
        failed = np.flatnonzero(self.image_failures)
        if len(failed) == 0:
            return []
        rows = self.first_query[failed]
        image_ids = self.manifest.column("image_id").take(rows).to_pylist()
        paths = self.manifest.column("image_path").take(rows).to_pylist()
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
        """(n,) int64: the queries whose image was cached (stage 2 trains on these)."""
        return np.flatnonzero(self.image_failures[self.image_index] == 0).astype(np.int64)

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

    # -- reading samples ----------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise StoreError(f"store {self.url} caches layer(s) {list(self.layers)}, not {layer}")

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
            sam_embedding: (256, 64, 64) float16.
            original_size: (2,) int (h, w); input_size: (2,) int (h, w) before padding.
            image_index: int; query_ids: (n,) int64, the image's queries.
        """
        self._check_layer(layer)
        self._check_image(image)
        first = int(self.first_query[image])
        end = int(self.first_query[image + 1]) if image + 1 < self.num_images else self.num_queries
        return {
            "image_states": self.array(image_array_name(layer))[image],
            "sam_embedding": self.array("images/sam")[image],
            "original_size": self._original_size[image].astype(np.int64),
            "input_size": self._input_size[image].astype(np.int64),
            "image_index": int(image),
            "query_ids": np.arange(first, end, dtype=np.int64),
        }

    def read_query(self, query: int, layer: int) -> dict[str, Any]:
        """Everything stage 2 needs for one query.

        Returns:
            image_states: (576, d) float16; text_states: (L_t, d) float16 (the last
            row is the start-of-answer token); sam_embedding: (256, 64, 64) float16;
            original_size, input_size: (2,) int (h, w); image_index: int; query_id: int.
        """
        if not 0 <= query < self.num_queries:
            raise IndexError(f"query {query} out of range (store has {self.num_queries})")
        image = int(self.image_index[query])
        sample = self.read_image(image, layer)
        del sample["query_ids"]
        sample["text_states"] = self.array(text_array_name(layer))[query, : int(self.text_len[query])]
        sample["query_id"] = int(query)
        return sample


def _reopen(url: str, storage_options: dict) -> FeatureStore:
    return FeatureStore.open(url, require_complete=False, storage_options=storage_options)


def check_compatible(stores: Sequence[FeatureStore]) -> None:
    """Refuse to mix stores cached with different backbones (manifests may differ).

    Raises:
        StoreError: naming the first two stores that differ and how.
    """
    if not stores:
        return
    reference = stores[0]
    ours = {"layers": list(reference.layers), "hidden_size": reference.hidden_size, **reference.identity}
    for other in stores[1:]:
        if other.identity_hash == reference.identity_hash and other.layers == reference.layers:
            continue
        theirs = {"layers": list(other.layers), "hidden_size": other.hidden_size, **other.identity}
        diffs = describe_differences(ours, theirs)
        detail = "; ".join(f"{key}: {a!r} vs {b!r}" for key, a, b in diffs) or "identity hash"
        raise StoreError(
            f"stores {reference.url} and {other.url} were cached with different backbones ({detail}): they cannot be mixed"
        )


# ----------------------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`; ``ok`` is False when any problem was found."""

    url: str
    problems: list[str] = field(default_factory=list)
    failed_images: list[dict[str, Any]] = field(default_factory=list)
    blocks_done: int = 0
    num_blocks: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> Iterator[str]:
        yield f"store {self.url}: blocks {self.blocks_done}/{self.num_blocks} done"
        for failure in self.failed_images:
            yield f"skipped image {failure['image_index']} ({failure['image_id']}, {failure['reason']}): {failure['image_path']}"
        for problem in self.problems:
            yield f"PROBLEM: {problem}"
        yield "OK" if self.ok else f"NOT OK ({len(self.problems)} problem(s))"


def expected_arrays(attrs: dict) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """Array name -> (shape, dtype, chunk shape) that the attributes promise."""
    n_img, n_q, d = attrs["num_images"], attrs["num_queries"], attrs["hidden_size"]
    t, tokens, block = attrs["max_text_len"], attrs["num_image_tokens"], attrs["block_size"]
    arrays: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]] = {}
    for layer in attrs["layers"]:
        arrays[image_array_name(layer)] = ((n_img, tokens, d), STORAGE_DTYPE, (1, tokens, d))
        arrays[text_array_name(layer)] = ((n_q, t, d), STORAGE_DTYPE, (1, t, d))
    arrays["images/sam"] = ((n_img, *SAM_EMBEDDING_SHAPE), STORAGE_DTYPE, (1, *SAM_EMBEDDING_SHAPE))
    arrays["images/original_size"] = ((n_img, 2), "int32", (block, 2))
    arrays["images/input_size"] = ((n_img, 2), "int32", (block, 2))
    arrays["images/failed"] = ((n_img,), "uint8", (block,))
    arrays["images/first_query"] = ((n_img,), "int64", (min(n_img, INDEX_CHUNK),))
    arrays["queries/text_len"] = ((n_q,), "int32", (min(n_q, INDEX_CHUNK),))
    arrays["queries/image_index"] = ((n_q,), "int64", (min(n_q, INDEX_CHUNK),))
    arrays["queries/failed"] = ((n_q,), "uint8", (min(n_q, INDEX_CHUNK),))
    arrays["blocks/done"] = ((attrs["num_blocks"],), "uint8", (1,))
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
    problems = []
    done = store.done_flags()
    expected_images = {
        image
        for block in np.flatnonzero(done)
        for image in store.block_image_range(int(block))
        if store.image_failures[image] == 0
    }
    expected_queries = {int(q) for q in np.flatnonzero(np.isin(store.image_index, sorted(expected_images)))}
    names = [("images/sam", expected_images)]
    for layer in store.layers:
        names += [(image_array_name(layer), expected_images), (text_array_name(layer), expected_queries)]
    for name, expected in names:
        missing = expected - stored_chunk_rows(store, name)
        if missing:
            first = sorted(missing)[:5]
            problems.append(f"{name}: {len(missing)} sample(s) of finished blocks were never written (e.g. {first})")
    return problems


def verify_store(url: str | Path, *, storage_options: dict | None = None) -> VerifyReport:
    """Check a store end to end without reading the feature values.

    Every block done; every array present with the shape, dtype and chunks the
    attributes promise; identity hash == hash(identity); manifest hash == hash of
    the stored ``manifest.parquet``; every sample of every finished block written.
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
        stored_hash = manifest_hash(store.manifest)
    except (OSError, pa.ArrowException) as error:
        report.problems.append(f"{MANIFEST_FILE} unreadable: {error}")
    else:
        if stored_hash != attrs["manifest_hash"]:
            report.problems.append(
                f"{MANIFEST_FILE} has hash {stored_hash[:12]}, the attributes say {attrs['manifest_hash'][:12]}"
            )
        if store.manifest.num_rows != store.num_queries:
            report.problems.append(
                f"{MANIFEST_FILE} has {store.manifest.num_rows} rows, the store {store.num_queries} queries"
            )
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
    if present >= set(expected):
        report.problems += check_filled(store)
        if store.complete and not np.array_equal(
            store.array("queries/failed")[:], store.image_failures[store.image_index]
        ):
            report.problems.append("queries/failed disagrees with images/failed")
    report.failed_images = store.failed_images()
    return report
