"""Writing a feature store: creating it, writing its blocks, checking it before a resume, finishing it.

The parent creates every array once (:func:`create_store`, from :data:`lens_cache.store_format.SCHEMA`),
before any block; the writer of a block (:class:`StoreWriter`, one per worker) writes the
block's samples, sizes, failure codes and checksums, then its done flag; the parent marks the
store complete last (:func:`finalize_store`). A build over an existing store reopens it only
if it is the same build (:func:`prepare_store`) and first redoes what is damaged
(:func:`repair_damage`). What the backbones compute and how blocks are scheduled is
:mod:`lens_cache.build`'s; the contract is :mod:`lens_cache.store`'s docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import uuid

import numpy as np
import pyarrow as pa
from lens_cache.errors import DamagedStoreError, StoreError, UsageError
from lens_cache.identity import describe_differences, identity_hash, normalise_json
from lens_cache.progress import say
from lens_cache.version import created_by, library_versions
from lens_cache.store_format import (
    ATTRS_KEY,
    BITROUND_KEEPBITS,
    BLOCK_CHECKSUM_ARRAY,
    BLOCK_DONE,
    BY_BLOCK,
    CHECKSUM_ALGORITHM,
    CODEC_FEATURES,
    CODEC_ZSTD,
    COMPRESSIONS,
    FAILURE_REASONS,
    FIRST_QUERY,
    FORMAT_VERSION,
    IMAGE_FAILED,
    IMAGE_INDEX,
    INDEX_ARRAYS,
    INPUT_SIZE,
    MANIFEST_FILE,
    ORIGINAL_SIZE,
    PARTIAL_KEY,
    QUERY_FAILED,
    STORAGE_DTYPE,
    TEXT_LEN,
    VARIANT_TEXT_LEN,
    ZSTD_LEVEL,
    ImagePlan,
    StoreArray,
    StoreDescription,
    StorePrefix,
    StoreVariants,
    block_checksum,
    checksum_array_name,
    creation_arrays,
    is_query_array,
    sample_checksum,
    store_arrays,
    store_sample_arrays,
    stored_checksums,
)
from lens_cache.store_location import StoreLocation, foreign_entries, open_group, quiet_numcodecs, store_state
from lens_cache.store_reader import FeatureStore
from lens_cache.store_verify import check_filled, scan_store, unfilled_blocks
from zarr.codecs import ZstdCodec

# ----------------------------------------------------------------------------- codecs and manifest


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


def manifest_to_parquet_bytes(table: pa.Table, *, spec: str) -> bytes:
    """The manifest as a file ``lens_manifests.read_manifest`` accepts (version + hash stamped)."""
    import tempfile

    from lens_manifests import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST_FILE
        write_manifest(table, path, spec=spec)
        return path.read_bytes()


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


def create_store(
    location: StoreLocation,
    *,
    description: StoreDescription,
    manifest: pa.Table,
    plan: ImagePlan,
    text_len: np.ndarray,
    prefix: StorePrefix | None = None,
    variants: StoreVariants | None = None,
) -> None:
    """Create every array of a new store (the parent does this once, before any worker).

    The arrays are :data:`~lens_cache.store_format.SCHEMA`'s for the attributes the store will
    have (:func:`~lens_cache.store_format.store_arrays`); the index arrays and the prefix states are
    written here, and the attributes last (so a store killed before has no attributes and is recreated).

    Args:
        location: where; must be empty (the caller removes an old store first).
        description: identity, layers, sizes, spec, manifest hash, block size, compression.
        manifest: the manifest table, stored beside the arrays.
        plan: rows grouped into images and blocks.
        text_len: (N_q,) int, L_t of every query (by tokenisation, known up front).
        prefix: the states of the prompt's tokens before the image, one (P_pre, d) float16 array per
            cached layer (``prefix/mllm_l{L}``); None: the backbone gives none (the store has no ``prefix/``).
        variants: the question templates of the queries (``attrs["text_variants"]``) and the L_t of every
            query's training variants (``queries/variant_text_len``, only where there are more than one);
            None: no record (one question per query, as a store of format version 4).
    """
    codecs = {  # a bad compression name raises its one-line error here, before anything is written
        CODEC_FEATURES: feature_codecs(description.compression),
        CODEC_ZSTD: {"compressors": [ZstdCodec(level=ZSTD_LEVEL)], "filters": None},
    }
    num_images, num_queries = plan.num_images, plan.num_queries
    text_len = np.asarray(text_len, dtype=np.int32)
    if text_len.shape != (num_queries,) or text_len.min() < 0:
        raise ValueError("text_len must give a length for every query (0: a refused text)")
    index = index_arrays(plan, text_len)
    if prefix is not None and (not prefix.token_ids or set(prefix.states) != set(description.layers)):
        raise ValueError("the prefix needs at least one token and one array per cached layer")
    if prefix is not None:
        index.update(prefix.arrays())
    index.update(variant_index(variants, num_queries))
    attrs = {
        "format_version": FORMAT_VERSION,
        "identity": normalise_json(description.identity),
        "identity_hash": identity_hash(description.identity),
        "manifest_hash": description.manifest_hash,
        "spec": description.spec,
        "layers": list(description.layers),
        "hidden_size": description.hidden_size,
        "num_image_tokens": description.num_image_tokens,
        "sam_channels": description.sam_channels,
        "num_images": num_images,
        "num_queries": num_queries,
        "num_blocks": plan.num_blocks,
        "max_text_len": max(1, int(text_len.max())),
        "storage_dtype": STORAGE_DTYPE,
        "compression": description.compression,
        "block_size": plan.block_size,
        "failure_reasons": {str(code): reason for code, reason in FAILURE_REASONS.items()},
        "checksums": {
            "algorithm": CHECKSUM_ALGORITHM,
            # Q: the query checksums of a block are one chunk, written by the block's writer alone
            "block_queries": plan.max_block_queries,
            "index": {name: sample_checksum(values) for name, values in index.items()},
        },
        "prefix": prefix.record() if prefix is not None else None,
        "text_variants": variants.record() if variants is not None else None,
        "num_failed_images": None,
        "created_by": created_by(),
        "libraries": library_versions(),
        # this creation, apart from any other of the same build: a reader tells a rebuilt store from its own
        "build_id": uuid.uuid4().hex,
        "complete": False,
    }

    # Created with the partial marker in its first metadata write: a build killed from here on left a
    # store that a rerun recognises as its own (store_state "partial") and recreates, never "foreign".
    group = open_group(location, mode="w", attributes={PARTIAL_KEY: {"format_version": FORMAT_VERSION}})
    location.write_bytes(MANIFEST_FILE, manifest_to_parquet_bytes(manifest, spec=description.spec))
    with quiet_numcodecs():
        for array in store_arrays(attrs):
            created = group.create_array(
                array.name,
                shape=array.shape,
                chunks=array.chunks,
                dtype=array.dtype,
                fill_value=0,
                **codecs[array.spec.codec],
            )
            if array.name in index:
                created[:] = index[array.name]
    # Last step of creation, one metadata write: the store now says what it is.
    group.attrs.put({ATTRS_KEY: attrs})


def variant_index(variants: StoreVariants | None, num_queries: int) -> dict[str, np.ndarray]:
    """``queries/variant_text_len`` as stored, where the store has training variants; else nothing.

    Raises:
        ValueError: the lengths are not one row of ``count - 1`` per query.
    """
    if variants is None or variants.count <= 1:
        return {}
    lengths = np.asarray(variants.lengths, dtype=np.int32)
    if lengths.shape != (num_queries, variants.count - 1) or lengths.min() < -1:
        raise ValueError("the variants' lengths must be (N_q, count - 1), each >= -1")
    return {VARIANT_TEXT_LEN: lengths}


def index_arrays(plan: ImagePlan, text_len: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays the parent writes once at creation (:data:`INDEX_ARRAYS`, in its order), as stored."""
    values = {
        FIRST_QUERY: plan.first_query.astype(np.int64),
        IMAGE_INDEX: plan.image_index.astype(np.int64),
        TEXT_LEN: np.asarray(text_len, dtype=np.int32),
    }
    return {name: values[name] for name in INDEX_ARRAYS}


# ----------------------------------------------------------------------------- block writer


class StoreWriter:
    """A store opened ``r+`` by one worker; writes whole chunks only.

    Writes cover whole chunks (a full padded text row, a whole block of sizes), so
    zarr never reads a chunk back to merge a partial update. Every sample's checksum is
    taken from the bytes it writes (bit-rounded first for a ``bitround`` store, so that
    the checksum is of what reads back; the store's filter leaves rounded values as they are).
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


# ----------------------------------------------------------------------------- a build's store: create or resume, repair, finish


def prepare_store(
    location: StoreLocation,
    description: StoreDescription,
    *,
    manifest: pa.Table,
    plan: ImagePlan,
    text_len: np.ndarray,
    overwrite: bool,
    prefix: StorePrefix | None = None,
    variants: StoreVariants | None = None,
) -> FeatureStore:
    """Create the store, or reopen it for a resume after checking it is the same build.

    ``prefix``, ``variants``: see :func:`create_store` (a resumed store keeps its own, :func:`repair_damage`
    mends them).

    Raises:
        StoreError: the location holds something else, or a store of another
            identity/manifest/layout (one line naming what differs).
    """
    url = location.url
    state = store_state(location)
    if state == "foreign":
        raise StoreError(
            f"{url} exists and is not a lens feature store: refusing to write there (choose another --out)"
        )
    if state == "lens":
        existing = FeatureStore.open(url, require_complete=False, storage_options=location.storage_options)
        if overwrite:
            others = foreign_entries(location)
            if others:
                raise StoreError(
                    f"{url} holds files that are not part of the store ({', '.join(others[:4])}"
                    f"{' ...' if len(others) > 4 else ''}): --overwrite would delete them; move them or choose "
                    "another --out")
            location.remove()
            state = "absent"
        else:
            refuse_if_different(existing, description)
            return existing
    if state == "partial":  # killed while being created: nothing computed yet, start again
        location.remove()
    create_store(location, description=description, manifest=manifest, plan=plan, text_len=text_len, prefix=prefix,
                 variants=variants)
    return FeatureStore.open(url, require_complete=False, storage_options=location.storage_options)


def check_libraries(existing: FeatureStore, *, allow: bool) -> dict[str, str | None] | None:
    """Refuse to resume or repair ``existing`` under library versions other than those it recorded.

    The versions that shape features (:func:`lens_cache.version.library_versions`) are recorded at
    creation; blocks written under other versions would be other features in the same store. With
    ``allow`` the build goes on, and :func:`record_library_mix` notes the versions once it writes. A
    store from before the record (format < 6) is not checked.

    Returns:
        The current versions when they differ and ``allow`` is given (to record), else None.
    Raises:
        StoreError: the versions differ and ``allow`` is False (one line naming them and the choices).
    """
    recorded = existing.attrs.get("libraries")
    if recorded is None:
        return None
    current = library_versions()
    changed = [f"{name} {recorded.get(name)} -> {version}" for name, version in current.items()
               if recorded.get(name) != version]
    if not changed:
        return None
    if not allow:
        raise StoreError(
            f"store {existing.url} was built with other library versions ({', '.join(changed)}): blocks written now "
            "would hold other features; rebuild it with --overwrite, go back to its versions, or pass "
            "--allow-library-change to resume it and record the mix")
    return current


def record_library_mix(location: StoreLocation, versions: dict[str, str | None]) -> None:
    """Add ``versions`` to ``attrs["libraries_mixed"]``: the other library versions that wrote blocks."""
    group = open_group(location, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    mixed = list(attrs.get("libraries_mixed") or [])
    if versions not in mixed:
        mixed.append(versions)
    attrs["libraries_mixed"] = mixed
    group.attrs.put({ATTRS_KEY: attrs})


def refuse_if_different(existing: FeatureStore, wanted: StoreDescription) -> None:
    """Raise StoreError naming every setting in which ``existing`` differs from ``wanted``."""
    hint = "use another --out or --overwrite"
    have = existing.description()
    differences = [
        f"{key} {old!r} but this build asks for {new!r}"
        for key, old, new in describe_differences(have.comparable(), wanted.comparable())
    ]
    if have.manifest_hash != wanted.manifest_hash:
        differences.append(
            f"manifest {have.manifest_hash[:12]} ({existing.num_queries} queries) "
            f"but this build's manifest is {wanted.manifest_hash[:12]}"
        )
    if differences:
        # list values (layers) read better without quotes: [14] rather than '[14]'
        raise StoreError(f"store {existing.url} was built with " + "; ".join(differences) + f": {hint}")


def repair_damage(
    store: FeatureStore,
    *,
    manifest: pa.Table,
    plan: ImagePlan,
    text_len: np.ndarray,
    progress: bool,
    prefix: StorePrefix | None = None,
    variants: StoreVariants | None = None,
) -> FeatureStore:
    """Check an existing store before building on it, and make this build redo what is damaged.

    The manifest file, the index arrays and the prefix states are rewritten if they are not what
    the store recorded (the build has them all; a rewritten prefix's checksum is recorded anew, as
    another device may round its last bit differently). Every sample of every finished block is read back and
    checked (:func:`~lens_cache.store.scan_store`); a block with a damaged or missing
    sample loses its done flag, so the build recomputes exactly those blocks. A complete
    store that needs any repair (or whose warm-start file or ``queries/failed`` is
    damaged) is first marked incomplete (one metadata write), so a reader never takes a
    store under repair as finished.

    Returns:
        The store, reopened if anything was repaired.
    """
    location = store.location
    group = open_group(location, mode="r+")
    repaired: list[str] = []
    try:
        store.manifest  # noqa: B018 - checks the stored file against the recorded hash
    except DamagedStoreError:
        location.write_bytes(MANIFEST_FILE, manifest_to_parquet_bytes(manifest, spec=store.attrs["spec"]))
        repaired.append(f"rewrote {MANIFEST_FILE}")
    if store.checksums is not None:
        expected = index_arrays(plan, text_len)
        expected.update(variant_index(variants, plan.num_queries))
        shared = prefix.arrays() if prefix is not None else {}
        rechecked: dict[str, int] = {}
        for name in creation_arrays(store.attrs):
            try:
                store.checked_index_array(name)
            except DamagedStoreError:
                if name in expected:
                    group[name][:] = expected[name]
                elif name in shared and group[name].shape == shared[name].shape:
                    group[name][:] = shared[name]
                    rechecked[name] = sample_checksum(shared[name])
                else:
                    raise
                repaired.append(f"rewrote {name}")
        if rechecked:
            attrs = dict(group.attrs[ATTRS_KEY])
            attrs["checksums"] = {**attrs["checksums"], "index": {**attrs["checksums"]["index"], **rechecked}}
            group.attrs.put({ATTRS_KEY: attrs})
    if repaired:
        store = FeatureStore.open(store.url, require_complete=False, storage_options=location.storage_options)
    finished = [int(block) for block in np.flatnonzero(store.done_flags())]
    if finished:
        say(progress, f"checking every sample of the {len(finished)} finished block(s) of {store.url}")
    damaged = scan_store(store, finished, progress=progress, label="lens-cache check")
    for block in unfilled_blocks(store):
        damaged.setdefault(block, ["a sample's chunk is not in storage"])
    stale = bool(repaired) or bool(damaged)
    if store.complete and not stale:
        try:
            store.warm_start_bytes()
            failed = store.array(QUERY_FAILED)[:]
            stale = not np.array_equal(failed, store.query_failures())
        except StoreError:
            stale = True
        except Exception:  # queries/failed does not decode: finalize rewrites it  # noqa: BLE001
            stale = True
    if not stale:
        return store
    if store.complete:
        attrs = dict(group.attrs[ATTRS_KEY])
        attrs["complete"] = False
        group.attrs.put({ATTRS_KEY: attrs})
    for block, problems in sorted(damaged.items()):
        group[BLOCK_DONE][block] = 0
        say(progress, f"block {block} of {store.url} is damaged ({problems[0]}): recomputing it")
    for line in repaired:
        say(progress, f"{store.url}: {line} (it was damaged)")
    return FeatureStore.open(store.url, require_complete=False, storage_options=location.storage_options)


def finalize_store(store: FeatureStore) -> FeatureStore:
    """Check every block and sample, then mark the store complete (the last write).

    A finished block whose samples are missing (storage lost them) loses its done flag
    before the error, so the rerun the message asks for redoes it.
    """
    missing = store.missing_blocks()
    if missing:
        raise StoreError(
            f"store {store.url} is incomplete ({store.num_blocks - len(missing)}/{store.num_blocks} blocks): "
            "rerun the same `lens-cache build` command to finish it"
        )
    problems = check_filled(store)
    if problems:
        done = open_group(store.location, mode="r+")[BLOCK_DONE]
        for block in unfilled_blocks(store):
            done[block] = 0
        raise StoreError(f"store {store.url}: {problems[0]}: rerun the same `lens-cache build` command")
    store.warm_start_bytes()  # the file is there and is the one recorded (else StoreError)
    group = open_group(store.location, mode="r+")
    failures = store.array(IMAGE_FAILED)[:]
    group[QUERY_FAILED][:] = store.query_failures()
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["num_failed_images"] = int(np.count_nonzero(failures))
    attrs["complete"] = True
    group.attrs.put({ATTRS_KEY: attrs})  # one atomic metadata write, after everything else
    return FeatureStore.open(store.url, storage_options=store.location.storage_options)
