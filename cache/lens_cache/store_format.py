"""The feature store's format: its constants, its array schema and its checksums.

Every rule of what a store holds is written here once; :mod:`lens_cache.store` (whose
docstring is the full contract, with the table :func:`layout_table` renders) re-exports it.
It is the bottom of a build's walk (``build`` -> ``store_writer`` -> ``block_job`` -> here):
every other store module takes its names, shapes and checksums from this one.

* :data:`SCHEMA` is the one table of arrays: name, shape and chunks (in the dimension
  symbols of :data:`DIMENSIONS`, which :func:`dimensions` reads off a store's attributes),
  dtype, codecs and who writes it. Creation (:func:`lens_cache.store_create.create_store`),
  the block writer (:class:`lens_cache.block_writer.BlockWriter`), the reader and
  verification (:func:`expected_arrays`) all derive what they create, write, read and check
  from it; ``tests/test_cache_store.py`` pins it against :data:`FORMAT_VERSION`.
* A sample's checksum is the crc32 of its bytes as written (:func:`sample_checksum`), a
  block's that of its sizes and failure codes (:func:`block_checksum`).

Which rows make a block is :mod:`lens_cache.store_plan`; what a build records beside the
arrays (the prefix, the question templates, what the store is), :mod:`lens_cache.store_records`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

#: 4: the prompt's tokens before the image, once per layer (``prefix/mllm_l{L}``, ``attrs["prefix"]``).
#: 5: the text states of every question template of a query (``queries/variants_l{L}``,
#: ``queries/variant_text_len``, ``attrs["text_variants"]``); a store of one template per query has the
#: arrays of version 4.
#: 6: the versions of the libraries that shape the features (``attrs["libraries"]``; a resume under others
#: is refused unless allowed, and then recorded in ``attrs["libraries_mixed"]``); the arrays of version 5.
FORMAT_VERSION = 6
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4, 5, 6)
ATTRS_KEY = "lens_cache"
#: Written first at creation and replaced (atomically, in one metadata write) by
#: ``ATTRS_KEY`` once every array exists: a store killed while being created is
#: recognisable as ours and safely recreated.
PARTIAL_KEY = "lens_cache_partial"
MANIFEST_FILE = "manifest.parquet"
STORAGE_DTYPE = "float16"
COMPRESSIONS = ("lossless", "bitround", "int8", "none")
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

# ----------------------------------------------------------------------------- the schema

#: The dimension symbols of :data:`SCHEMA`'s shapes and chunks (:func:`dimensions` gives their values).
DIMENSIONS = {
    "N_img": "images (num_images)",
    "N_q": "queries (num_queries), rows of the manifest",
    "N_blocks": "blocks (num_blocks), ceil(N_img / B)",
    "B": "images per block (block_size)",
    "P": "image tokens (num_image_tokens, 576 for LLaVA-1.5)",
    "P_pre": "prompt tokens before the first image token (prefix.length: BOS, system prompt, USER:)",
    "d": "the MLLM's hidden size (hidden_size)",
    "T": "max_text_len, the longest L_t (of variant 0, the evaluation question)",
    "V_t": "text_variants.count - 1: the training questions of a query (its kind's templates after the first)",
    "T_v": "text_variants.max_len, the longest L_t of a training question",
    "C": "sam_channels, SAM's prompt width: 256 for SAM, 64 for the toy SAM (format 1: always 256)",
    "Q": "checksums.block_queries, the most queries of any block",
    "I_img": f"min(N_img, INDEX_CHUNK = {INDEX_CHUNK})",
    "I_q": "min(N_q, INDEX_CHUNK)",
}

#: Who writes an array (the ``by`` column of the layout).
BY_CREATION, BY_BLOCK, BY_COMPLETION = "create", "block", "finish"
WRITERS = {
    BY_CREATION: "the parent, once, before any block (rewritten by a build that finds it damaged)",
    BY_BLOCK: "the writer of the block that owns the rows (one worker), before the block's done flag",
    BY_COMPLETION: "the parent, after every block's done flag and before `complete`",
}

#: What an array holds (the ``kind`` of a row): per-sample features (one chunk per sample),
#: checksums (format version 2 on: absent from a version-1 store), bookkeeping, or features shared by
#: every sample (format version 4 on, and only where the backbone gave them: ``attrs["prefix"]``).
SAMPLE, CHECKSUM, BOOKKEEPING, SHARED = "sample", "checksum", "bookkeeping", "shared"
#: Bookkeeping written at creation whose checksum is in ``attrs["checksums"]["index"]`` but which only a
#: store with text variants has (format 5): ``queries/variant_text_len``.
VARIANT_INDEX = "variant-index"
#: The codecs of an array (the ``codec`` column of the layout).
CODEC_FEATURES, CODEC_ZSTD = "store", "zstd"
CODECS = {
    CODEC_FEATURES: f"the store's compression ({', '.join(COMPRESSIONS)}): store_create.feature_codecs",
    CODEC_ZSTD: f"zstd level {ZSTD_LEVEL}, whatever the compression",
}

#: ``{L}`` in a name: one array per cached layer.
LAYER_FIELD = "{L}"


@dataclass(frozen=True)
class ArraySpec:
    """One row of :data:`SCHEMA`: an array of the store, in the symbols of :data:`DIMENSIONS`."""

    name: str
    shape: tuple[str | int, ...]
    dtype: str
    chunks: tuple[str | int, ...]
    written_by: str
    kind: str
    codec: str
    note: str = ""
    #: Present only where the store has them: ``"variants"`` (format 5, ``text_variants.count`` > 1).
    needs: str = ""

    @property
    def per_layer(self) -> bool:
        return LAYER_FIELD in self.name


# ----------------------------------------------------------------------------- naming


def _layer_name(spec: ArraySpec, layer: int | None) -> str:
    """The name of ``spec``'s array for ``layer`` (``images/mllm_l{L}`` -> ``images/mllm_l14``)."""
    return spec.name.replace(LAYER_FIELD, str(layer)) if layer is not None else spec.name


def image_array_name(layer: int) -> str:
    """Array of the MLLM image-token states of ``layer``: (N_img, 576, d)."""
    return _layer_name(IMAGE_STATES, layer)


def text_array_name(layer: int) -> str:
    """Array of the text-token states of ``layer``: (N_q, max_text_len, d)."""
    return _layer_name(TEXT_STATES, layer)


def variants_array_name(layer: int) -> str:
    """Array of the text states of the training questions (variants 1..) at ``layer``: (N_q, V_t, T_v, d)."""
    return _layer_name(TEXT_VARIANTS, layer)


def prefix_array_name(layer: int) -> str:
    """Array of the states of the prompt's tokens before the image, at ``layer``: (P_pre, d), once per store."""
    return _layer_name(PREFIX_STATES, layer)


def checksum_array_name(name: str) -> str:
    """Array of the per-sample checksums of the feature array ``name`` (``images/sam`` -> ``images/sam_crc32``)."""
    return f"{name}{CHECKSUM_SUFFIX}"


# ----------------------------------------------------------------------------- the arrays

IMAGE_STATES = ArraySpec("images/mllm_l{L}", ("N_img", "P", "d"), STORAGE_DTYPE, (1, "P", "d"), BY_BLOCK, SAMPLE,
                         CODEC_FEATURES, "MLLM image-token states")
TEXT_STATES = ArraySpec("queries/text_l{L}", ("N_q", "T", "d"), STORAGE_DTYPE, (1, "T", "d"), BY_BLOCK, SAMPLE,
                        CODEC_FEATURES, "text states, right-padded")
#: The text states of a query's other question templates (variants 1.., the training questions), one
#: chunk per query (format 5, only where the question set has more than one template).
TEXT_VARIANTS = ArraySpec("queries/variants_l{L}", ("N_q", "V_t", "T_v", "d"), STORAGE_DTYPE, (1, "V_t", "T_v", "d"),
                          BY_BLOCK, SAMPLE, CODEC_FEATURES, "variants 1.., right-padded", needs="variants")
#: A causal MLLM's states of the tokens before the first image token do not depend on the image: one
#: copy per layer, written with the index arrays (lossless whatever the compression; checksum in
#: ``attrs["checksums"]["index"]``).
PREFIX_STATES = ArraySpec("prefix/mllm_l{L}", ("P_pre", "d"), STORAGE_DTYPE, ("P_pre", "d"), BY_CREATION, SHARED,
                          CODEC_ZSTD, "states before the image")
SAM_EMBEDDINGS = ArraySpec("images/sam", ("N_img", "C", SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE), STORAGE_DTYPE,
                           (1, "C", SAM_EMBEDDING_SIZE, SAM_EMBEDDING_SIZE), BY_BLOCK, SAMPLE, CODEC_FEATURES,
                           "SAM image embedding")

#: The bookkeeping arrays' names (their rows in :data:`SCHEMA`).
ORIGINAL_SIZE = "images/original_size"
INPUT_SIZE = "images/input_size"
IMAGE_FAILED = "images/failed"
FIRST_QUERY = "images/first_query"
TEXT_LEN = "queries/text_len"
IMAGE_INDEX = "queries/image_index"
QUERY_FAILED = "queries/failed"
VARIANT_TEXT_LEN = "queries/variant_text_len"
BLOCK_DONE = "blocks/done"

#: Every array of a store (format version 5; its ``queries/variant*`` rows only where the question set has
#: more than one template per query, as version 4 has none; versions 2 and 3 have the same without
#: ``prefix/``, version 1 also without the checksums). Arrays in ``images/`` have one row per image, in ``queries/`` one per
#: query, in ``blocks/`` one per block, in ``prefix/`` one per store; a run of ``{L}`` rows repeats, as a
#: group, for each cached layer.
SCHEMA: tuple[ArraySpec, ...] = (
    IMAGE_STATES,
    TEXT_STATES,
    TEXT_VARIANTS,
    SAM_EMBEDDINGS,
    PREFIX_STATES,
    ArraySpec(ORIGINAL_SIZE, ("N_img", 2), "int32", ("B", 2), BY_BLOCK, BOOKKEEPING, CODEC_ZSTD,
              "(h, w)"),
    ArraySpec(INPUT_SIZE, ("N_img", 2), "int32", ("B", 2), BY_BLOCK, BOOKKEEPING, CODEC_ZSTD,
              "(h, w) before padding"),
    ArraySpec(IMAGE_FAILED, ("N_img",), "uint8", ("B",), BY_BLOCK, BOOKKEEPING, CODEC_ZSTD,
              "0 ok, else FAILURE_REASONS"),
    ArraySpec(FIRST_QUERY, ("N_img",), "int64", ("I_img",), BY_CREATION, BOOKKEEPING, CODEC_ZSTD,
              "first query of each image"),
    ArraySpec(TEXT_LEN, ("N_q",), "int32", ("I_q",), BY_CREATION, BOOKKEEPING, CODEC_ZSTD,
              "L_t; 0: text refused"),
    ArraySpec(IMAGE_INDEX, ("N_q",), "int64", ("I_q",), BY_CREATION, BOOKKEEPING, CODEC_ZSTD,
              "image of each query"),
    ArraySpec(VARIANT_TEXT_LEN, ("N_q", "V_t"), "int32", ("I_q", "V_t"), BY_CREATION, VARIANT_INDEX, CODEC_ZSTD,
              "L_t of variant v+1; 0 none; -1 refused", needs="variants"),
    ArraySpec(QUERY_FAILED, ("N_q",), "uint8", ("I_q",), BY_COMPLETION, BOOKKEEPING, CODEC_ZSTD,
              "its image's code or bad_text"),
    ArraySpec(BLOCK_DONE, ("N_blocks",), "uint8", (1,), BY_BLOCK, BOOKKEEPING, CODEC_ZSTD,
              "1 once block b is written"),
    ArraySpec(checksum_array_name(SAM_EMBEDDINGS.name), ("N_img",), "uint32", ("B",), BY_BLOCK, CHECKSUM,
              CODEC_ZSTD, "crc32 per image"),
    ArraySpec(checksum_array_name(IMAGE_STATES.name), ("N_img",), "uint32", ("B",), BY_BLOCK, CHECKSUM,
              CODEC_ZSTD, "crc32 per image"),
    ArraySpec(checksum_array_name(TEXT_STATES.name), ("N_blocks", "Q"), "uint32", (1, "Q"), BY_BLOCK, CHECKSUM,
              CODEC_ZSTD, "row b: block b's queries"),
    ArraySpec(checksum_array_name(TEXT_VARIANTS.name), ("N_blocks", "Q"), "uint32", (1, "Q"), BY_BLOCK, CHECKSUM,
              CODEC_ZSTD, "row b: block b's queries", needs="variants"),
    ArraySpec(BLOCK_CHECKSUM_ARRAY, ("N_blocks",), "uint32", (1,), BY_BLOCK, CHECKSUM, CODEC_ZSTD,
              "block b's sizes, failures"),
)


@dataclass(frozen=True)
class StoreArray:
    """An array of one store: :class:`ArraySpec` with the store's numbers (and its layer) filled in."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    spec: ArraySpec


def dimensions(attrs: dict) -> dict[str, int]:
    """The value of each symbol of :data:`DIMENSIONS` for a store's ``lens_cache`` attributes
    (``Q`` only where the store has checksums)."""
    n_img, n_q = int(attrs["num_images"]), int(attrs["num_queries"])
    values = {
        "N_img": n_img,
        "N_q": n_q,
        "N_blocks": int(attrs["num_blocks"]),
        "B": int(attrs["block_size"]),
        "P": int(attrs["num_image_tokens"]),
        "d": int(attrs["hidden_size"]),
        "T": int(attrs["max_text_len"]),
        "C": stored_sam_channels(attrs),
        "I_img": min(n_img, INDEX_CHUNK),
        "I_q": min(n_q, INDEX_CHUNK),
    }
    checksums = stored_checksums(attrs)
    if checksums is not None:
        values["Q"] = int(checksums["block_queries"])
    prefix = stored_prefix(attrs)
    if prefix is not None:
        values["P_pre"] = int(prefix["length"])
    slots = variant_slots(attrs)
    if slots:
        values["V_t"] = slots
        values["T_v"] = int(attrs["text_variants"]["max_len"])
    return values


def _present(spec: ArraySpec, attrs: dict) -> bool:
    """Whether a store with these attributes has ``spec``'s arrays."""
    if spec.kind == CHECKSUM and stored_checksums(attrs) is None:
        return False
    if spec.kind == SHARED and stored_prefix(attrs) is None:
        return False
    return not (spec.needs == "variants" and not variant_slots(attrs))


def _expanded(layers: Sequence[int], specs: Sequence[ArraySpec]) -> Iterator[tuple[ArraySpec, int | None]]:
    """Each spec with its layer: a run of consecutive ``{L}`` specs repeats, as a group, for each layer."""
    position = 0
    while position < len(specs):
        if not specs[position].per_layer:
            yield specs[position], None
            position += 1
            continue
        end = position
        while end < len(specs) and specs[end].per_layer:
            end += 1
        for layer in layers:
            for spec in specs[position:end]:
                yield spec, int(layer)
        position = end


def store_arrays(attrs: dict) -> list[StoreArray]:
    """Every array a store with these ``lens_cache`` attributes holds, in :data:`SCHEMA`'s order
    (the checksums only where the store has them: format version 2 on; the prefix only where
    ``attrs["prefix"]`` records one: format version 4 on; the text variants only where
    ``attrs["text_variants"]`` records more than one: format version 5 on)."""
    sizes = dimensions(attrs)
    specs = [spec for spec in SCHEMA if _present(spec, attrs)]

    def numbers(symbols: tuple[str | int, ...]) -> tuple[int, ...]:
        return tuple(value if isinstance(value, int) else sizes[value] for value in symbols)

    return [
        StoreArray(
            name=_layer_name(spec, layer),
            shape=numbers(spec.shape),
            dtype=spec.dtype,
            chunks=numbers(spec.chunks),
            spec=spec,
        )
        for spec, layer in _expanded(attrs["layers"], specs)
    ]


def expected_arrays(attrs: dict) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """Array name -> (shape, dtype, chunk shape) that the attributes promise."""
    return {array.name: (array.shape, array.dtype, array.chunks) for array in store_arrays(attrs)}


def _names(layers: Sequence[int], specs: Sequence[ArraySpec]) -> list[str]:
    return [_layer_name(spec, layer) for spec, layer in _expanded(layers, specs)]


def sample_arrays(layers: Sequence[int], variants: bool = False) -> list[str]:
    """The per-sample feature arrays of a store: the SAM embeddings, then image and text states per layer
    (and, with ``variants``, the text states of the other question templates: see :func:`store_sample_arrays`)."""
    samples = [spec for spec in SCHEMA if spec.kind == SAMPLE and (variants or spec.needs != "variants")]
    return _names(layers, [s for s in samples if not s.per_layer]) + _names(layers, [s for s in samples if s.per_layer])


def store_sample_arrays(attrs: dict) -> list[str]:
    """:func:`sample_arrays` of the store with these attributes (with its text variants where it has them)."""
    return sample_arrays(attrs["layers"], variants=bool(variant_slots(attrs)))


@functools.cache
def array_spec(name: str) -> ArraySpec:
    """The :data:`SCHEMA` row of the store array ``name`` (``images/mllm_l14`` -> :data:`IMAGE_STATES`).

    Raises:
        KeyError: ``name`` is no array of the store format.
    """
    for spec in SCHEMA:
        if not spec.per_layer:
            if spec.name == name:
                return spec
            continue
        prefix, _, suffix = spec.name.partition(LAYER_FIELD)
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
            if name[len(prefix) : len(name) - len(suffix)].isdigit():  # the layer
                return spec
    raise KeyError(f"{name!r} is no array of the store format")


def is_query_array(name: str) -> bool:
    """Whether the store array ``name`` has one row per query (its :data:`SCHEMA` shape starts with ``N_q``)."""
    return array_spec(name).shape[0] == "N_q"


def is_image_array(name: str) -> bool:
    """Whether the store array ``name`` has one row per image (its :data:`SCHEMA` shape starts with ``N_img``)."""
    return array_spec(name).shape[0] == "N_img"


#: The Zarr groups that hold the arrays (``blocks``, ``images``, ``queries``).
ARRAY_GROUPS = tuple(sorted({spec.name.split("/", 1)[0] for spec in SCHEMA}))

#: The bookkeeping arrays written once by the parent at creation (sorted by name), their checksums in
#: ``attrs["checksums"]["index"]`` in this order.
INDEX_ARRAYS = tuple(
    sorted(spec.name for spec in SCHEMA if spec.written_by == BY_CREATION and spec.kind == BOOKKEEPING)
)


def creation_arrays(attrs: dict) -> list[str]:
    """Every array the parent writes at creation and checks as a whole against ``attrs["checksums"]["index"]``:
    :data:`INDEX_ARRAYS`, then ``queries/variant_text_len`` and the prefix states of each layer where the
    store has them."""
    prefix = [prefix_array_name(layer) for layer in attrs["layers"]] if stored_prefix(attrs) is not None else []
    variants = [VARIANT_TEXT_LEN] if variant_slots(attrs) else []
    return [*INDEX_ARRAYS, *variants, *prefix]


def layout_table() -> str:
    """:data:`SCHEMA`, its symbols, writers and codecs as the text of :mod:`lens_cache.store`'s docstring
    (a test checks that the docstring holds it)."""

    def symbols(values: tuple[str | int, ...]) -> str:
        return "(" + ", ".join(map(str, values)) + ("," if len(values) == 1 else "") + ")"

    def aligned(rows: list[tuple[str, ...]]) -> list[str]:
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]

    lines = aligned([(symbol, meaning) for symbol, meaning in DIMENSIONS.items()])
    lines += [""] + aligned([(f"by {key}:", meaning) for key, meaning in WRITERS.items()])
    lines += aligned([(f"codec {key}:", meaning) for key, meaning in CODECS.items()])
    header = ("array", "shape", "dtype", "chunk", "by", "codec", "")
    rows = [(spec.name, symbols(spec.shape), spec.dtype, symbols(spec.chunks), spec.written_by, spec.codec, spec.note)
            for spec in SCHEMA]
    return "\n".join(lines + [""] + aligned([header, *rows]))


# ----------------------------------------------------------------------------- values and checksums


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
    return tuple(channels if size == "C" else size for size in SAM_EMBEDDINGS.shape[1:])  # type: ignore[return-value]


def stored_prefix(attrs: dict) -> dict | None:
    """``attrs["prefix"]`` (``length`` P_pre, ``token_ids``), or None: a store of format version 3 or older, or
    one whose backbone gives no prefix states (a fake one)."""
    return attrs.get("prefix")


def stored_text_variants(attrs: dict) -> dict | None:
    """``attrs["text_variants"]`` (``question_set``, ``count``, ``max_len``, ``names``), or None for a store of
    format version 4 or older (one question per query)."""
    return attrs.get("text_variants")


def variant_slots(attrs: dict) -> int:
    """V_t, the training variants per query a store has room for (0: one question per query)."""
    record = stored_text_variants(attrs)
    return max(int(record["count"]) - 1, 0) if record else 0


def stored_sam_channels(attrs: dict) -> int:
    """C of a store's SAM embeddings, from its attributes (format version 1: always 256)."""
    return int(attrs.get("sam_channels", DEFAULT_SAM_CHANNELS))


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


def manifest_hash(table: pa.Table) -> str:
    """The manifest's content hash (``lens_manifests.manifest_hash``), recorded as ``manifest_hash``."""
    from lens_manifests import manifest_hash as _manifest_hash

    return _manifest_hash(table)

