"""Creating a feature store: every array once, the index arrays and the attributes, before any block.

The first step of a build's writing (:func:`lens_cache.store_writer.prepare_store` calls
:func:`create_store` for a new store): the arrays are :data:`lens_cache.store_format.SCHEMA`'s
for the attributes the store will have; the manifest file, the index arrays (which image each
query is of, the first query of each image, every L_t) and the prefix states are written here;
the attributes come last, in one metadata write, so a store killed while being created is
recognised as such and recreated. The blocks are written afterwards by the block writer
(:mod:`lens_cache.block_writer`); the contract is :mod:`lens_cache.store`'s docstring.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from lens_cache.errors import UsageError
from lens_cache.identity import identity_hash, normalise_json
from lens_cache.store_format import (
    ATTRS_KEY,
    BITROUND_KEEPBITS,
    CHECKSUM_ALGORITHM,
    CODEC_FEATURES,
    COMPRESSIONS,
    FAILURE_REASONS,
    FIRST_QUERY,
    FORMAT_VERSION,
    IMAGE_INDEX,
    INDEX_ARRAYS,
    MANIFEST_FILE,
    PARTIAL_KEY,
    SAM_EMBEDDINGS,
    STORAGE_DTYPE,
    TEXT_LEN,
    VARIANT_TEXT_LEN,
    ZSTD_LEVEL,
    ArraySpec,
    sample_checksum,
    store_arrays,
)
from lens_cache.store_codec import Int8RowScaleCodec
from lens_cache.store_location import StoreLocation, open_group, quiet_numcodecs
from lens_cache.store_plan import ImagePlan
from lens_cache.store_records import StoreDescription, StorePrefix, StoreVariants
from lens_cache.version import created_by, library_versions
from zarr.codecs import ZstdCodec

# ----------------------------------------------------------------------------- codecs and manifest


def feature_codecs(compression: str, row_axes: int = 1) -> dict[str, Any]:
    """``filters``/``serializer``/``compressors`` for the float16 feature arrays.

    ``lossless``: zstd (which saves only ~8% on float16 activations).
    ``bitround``: keep 7 of float16's 10 mantissa bits, then zstd (~1.3x).
    ``int8``: each row as int8 with its float16 absmax scale (:mod:`lens_cache.store_codec`; ``row_axes``
    trailing axes make a row: :func:`feature_row_axes`), then zstd (~2x).
    ``none``: raw bytes (fastest to write and read).
    """
    if compression == "int8":
        return {"filters": None, "serializer": Int8RowScaleCodec(row_axes=row_axes),
                "compressors": [ZstdCodec(level=ZSTD_LEVEL)]}
    if compression == "lossless":
        return {"filters": None, "compressors": [ZstdCodec(level=ZSTD_LEVEL)]}
    if compression == "bitround":
        from zarr.codecs.numcodecs import BitRound

        with quiet_numcodecs():
            return {"filters": [BitRound(keepbits=BITROUND_KEEPBITS)], "compressors": [ZstdCodec(level=ZSTD_LEVEL)]}
    if compression == "none":
        return {"filters": None, "compressors": None}
    raise UsageError(f"unknown compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")


def feature_row_axes(spec: ArraySpec) -> int:
    """The trailing axes of one ``int8`` row of a feature array: a token's d-vector (1), or for SAM's (C, 64, 64)
    embedding one channel's 64 x 64 map (2: its own scale per channel, contiguous in the chunk; see
    :mod:`lens_cache.store_codec`)."""
    return 2 if spec == SAM_EMBEDDINGS else 1


def manifest_to_parquet_bytes(table: pa.Table, *, spec: str) -> bytes:
    """The manifest as a file ``lens_manifests.read_manifest`` accepts (version + hash stamped)."""
    import tempfile

    from lens_manifests import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST_FILE
        write_manifest(table, path, spec=spec)
        return path.read_bytes()


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
    feature_codecs(description.compression)  # a bad compression name: its one-line error, before anything is written
    zstd = {"compressors": [ZstdCodec(level=ZSTD_LEVEL)], "filters": None}
    text_len = np.asarray(text_len, dtype=np.int32)
    if text_len.shape != (plan.num_queries,) or text_len.min() < 0:
        raise ValueError("text_len must give a length for every query (0: a refused text)")
    index = index_arrays(plan, text_len)
    if prefix is not None and (not prefix.token_ids or set(prefix.states) != set(description.layers)):
        raise ValueError("the prefix needs at least one token and one array per cached layer")
    if prefix is not None:
        index.update(prefix.arrays())
    index.update(variant_index(variants, plan.num_queries))
    attrs = creation_attributes(description, plan, text_len, index, prefix=prefix, variants=variants)

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
                **(feature_codecs(description.compression, feature_row_axes(array.spec))
                   if array.spec.codec == CODEC_FEATURES else zstd),
            )
            if array.name in index:
                created[:] = index[array.name]
    # Last step of creation, one metadata write: the store now says what it is.
    group.attrs.put({ATTRS_KEY: attrs})


def creation_attributes(
    description: StoreDescription,
    plan: ImagePlan,
    text_len: np.ndarray,
    index: dict[str, np.ndarray],
    *,
    prefix: StorePrefix | None,
    variants: StoreVariants | None,
) -> dict[str, Any]:
    """The ``lens_cache`` attribute of a new store: what it is, its sizes, the checksums of the arrays
    written at creation (``index``), the prefix and question-template records, and who made it."""
    return {
        "format_version": FORMAT_VERSION,
        "identity": normalise_json(description.identity),
        "identity_hash": identity_hash(description.identity),
        "manifest_hash": description.manifest_hash,
        "spec": description.spec,
        "layers": list(description.layers),
        "hidden_size": description.hidden_size,
        "num_image_tokens": description.num_image_tokens,
        "sam_channels": description.sam_channels,
        "num_images": plan.num_images,
        "num_queries": plan.num_queries,
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
