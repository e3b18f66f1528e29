"""The feature store: the versioned, self-describing contract between stage 1 and stage 2.

One Zarr v3 group holds the features of one (dataset split, backbone, layer set,
prompt template). Everything that made it what it is sits in the group attribute
``lens_cache`` (pinned by ``tests/test_cache_store.py``), the manifest it was built from sits beside
the arrays as ``manifest.parquet``, and a reader refuses a store that is not
finished or not what it expects.

Layout. Beside the arrays::

    zarr.json                              attrs["lens_cache"]: format_version, identity, ..., complete
    manifest.parquet                       the manifest (one row per query, query_id == row)
    warm_start/decoder_layers.safetensors  the MLLM's decoder layers k, k+1 per cached layer k (head warm start)

The arrays are the rows of :data:`lens_cache.store_format.SCHEMA`, from which creation, the
block writer, the reader and ``verify`` all take them; below is its
:func:`~lens_cache.store_format.layout_table` (``tests/test_cache_store.py`` checks that this
docstring holds it, and pins the schema of a small store against the format version). An
``images/`` array has one row per image, a ``queries/`` array one per query, a ``blocks/``
array one per block; a ``{L}`` row is one array per cached layer L (the states of
``hidden_states[L]``); the checksums (``*_crc32``, ``blocks/crc32``) are absent from a
version-1 store; a ``prefix/`` array is one per store and layer (the states of the P_pre prompt tokens
before the first image token, the same for every image of a causal MLLM; token ids in
``attrs["prefix"]``), absent before version 4 and where the backbone gives none (a fake one); the
``queries/variant*`` arrays (the text states of a query's other question templates) exist only in a
version-5 store whose question set has more than one template per query. Every array's fill value is 0::

    N_img     images (num_images)
    N_q       queries (num_queries), rows of the manifest
    N_blocks  blocks (num_blocks), ceil(N_img / B)
    B         images per block (block_size)
    P         image tokens (num_image_tokens, 576 for LLaVA-1.5)
    P_pre     prompt tokens before the first image token (prefix.length: BOS, system prompt, USER:)
    d         the MLLM's hidden size (hidden_size)
    T         max_text_len, the longest L_t (of variant 0, the evaluation question)
    V_t       text_variants.count - 1: the training questions of a query (its kind's templates after the first)
    T_v       text_variants.max_len, the longest L_t of a training question
    C         sam_channels, SAM's prompt width: 256 for SAM, 64 for the toy SAM (format 1: always 256)
    Q         checksums.block_queries, the most queries of any block
    I_img     min(N_img, INDEX_CHUNK = 65536)
    I_q       min(N_q, INDEX_CHUNK)

    by create:  the parent, once, before any block (rewritten by a build that finds it damaged)
    by block:   the writer of the block that owns the rows (one worker), before the block's done flag
    by finish:  the parent, after every block's done flag and before `complete`
    codec store:  the store's compression (lossless, bitround, int8, none): store_create.feature_codecs
    codec zstd:   zstd level 3, whatever the compression

    array                        shape               dtype    chunk             by      codec
    images/mllm_l{L}             (N_img, P, d)       float16  (1, P, d)         block   store  MLLM image-token states
    queries/text_l{L}            (N_q, T, d)         float16  (1, T, d)         block   store  text states, right-padded
    queries/variants_l{L}        (N_q, V_t, T_v, d)  float16  (1, V_t, T_v, d)  block   store  variants 1.., right-padded
    images/sam                   (N_img, C, 64, 64)  float16  (1, C, 64, 64)    block   store  SAM image embedding
    prefix/mllm_l{L}             (P_pre, d)          float16  (P_pre, d)        create  zstd   states before the image
    images/original_size         (N_img, 2)          int32    (B, 2)            block   zstd   (h, w)
    images/input_size            (N_img, 2)          int32    (B, 2)            block   zstd   (h, w) before padding
    images/failed                (N_img,)            uint8    (B,)              block   zstd   0 ok, else FAILURE_REASONS
    images/first_query           (N_img,)            int64    (I_img,)          create  zstd   first query of each image
    queries/text_len             (N_q,)              int32    (I_q,)            create  zstd   L_t; 0: text refused
    queries/image_index          (N_q,)              int64    (I_q,)            create  zstd   image of each query
    queries/variant_text_len     (N_q, V_t)          int32    (I_q, V_t)        create  zstd   L_t of variant v+1; 0 none; -1 refused
    queries/failed               (N_q,)              uint8    (I_q,)            finish  zstd   its image's code or bad_text
    blocks/done                  (N_blocks,)         uint8    (1,)              block   zstd   1 once block b is written
    images/sam_crc32             (N_img,)            uint32   (B,)              block   zstd   crc32 per image
    images/mllm_l{L}_crc32       (N_img,)            uint32   (B,)              block   zstd   crc32 per image
    queries/text_l{L}_crc32      (N_blocks, Q)       uint32   (1, Q)            block   zstd   row b: block b's queries
    queries/variants_l{L}_crc32  (N_blocks, Q)       uint32   (1, Q)            block   zstd   row b: block b's queries
    blocks/crc32                 (N_blocks,)         uint32   (1,)              block   zstd   block b's sizes, failures

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
store still warm-starts its first layer. Version 4 adds ``prefix/mllm_l{L}`` and ``attrs["prefix"]``
(``length``, ``token_ids``; None where there is none), written at creation with the index arrays,
their checksums in ``attrs["checksums"]["index"]``; a version-3 store reads with
:meth:`FeatureStore.prefix_states` None. Version 5 caches, for every query, the text states of every
template of its kind in the store's question set (:mod:`lens_cache.questions`): variant 0 (the
evaluation question) in ``queries/text_l{L}`` as before, variants 1.. (the training questions, in the
set's order) in ``queries/variants_l{L}`` (one chunk per query, its checksum in
``queries/variants_l{L}_crc32``, written by the block's writer with the rest), their L_t in
``queries/variant_text_len`` (written at creation, checksum in ``attrs["checksums"]["index"]``), the set in
``attrs["text_variants"]`` (``question_set``, ``count``, ``max_len``, ``names``). A store of one template per
query (the ``single`` set) has the arrays of version 4; a store of version 4 or older reads as one variant
(:meth:`FeatureStore.num_text_variants`, :meth:`FeatureStore.read_query` ``variant=``).
Version 6 has the arrays of version 5 and two attributes more: ``libraries`` (the versions of
the libraries that shape the features, :func:`lens_cache.version.library_versions`; a resume under
others is refused unless allowed, then recorded in ``libraries_mixed``) and ``build_id`` (one per
creation: a reader tells a store rebuilt under it from damage).

Skipped samples (one bad sample never stops a build): an image that is missing,
unreadable, of another size than the manifest says, or of a shape SAM's frame cannot
take has its ``FAILURE_REASONS`` code in ``images/failed`` and no features; a query whose
text the backbone refuses (a special token such as ``<image>`` in it, a prompt longer
than the MLLM's context) has ``text_len`` 0 and code ``bad_text`` in ``queries/failed``;
an image none of whose queries is usable is skipped as ``bad_text`` too. Readers serve
:meth:`FeatureStore.valid_query_ids` only; ``lens-cache info`` and ``verify`` list the rest.


Where it is written (this module re-exports the names readers, the CLI and the tests use from
them; hashing is :mod:`lens_cache.identity`, the errors :mod:`lens_cache.errors`). Reading, bottom up:

* :mod:`lens_cache.store_format`: the constants, the schema, checksums;
* :mod:`lens_cache.store_plan`: which rows make an image and a block (:class:`ImagePlan`, :func:`plan_images`);
* :mod:`lens_cache.store_records`: what a build records beside the arrays (prefix, question templates,
  :class:`StoreDescription`);
* :mod:`lens_cache.store_location`: local paths and fsspec URLs, opening the group;
* :mod:`lens_cache.store_checked`: attributes and arrays, every value read back checked;
* :mod:`lens_cache.store_reader`: :class:`FeatureStore`, :func:`require_layer`, :func:`check_compatible`;
* :mod:`lens_cache.store_blocks`: which blocks are missing or damaged (:func:`scan_store`), redoing them;
* :mod:`lens_cache.store_verify`: :func:`verify_store`.

Writing, in a build's order (:mod:`lens_cache.build` walks them top-down):

* :mod:`lens_cache.store_writer`: a build's store: create or resume, repair, finish;
* :mod:`lens_cache.store_create`: creation, every array once, before any block;
* :mod:`lens_cache.block_writer`: one block's samples, sizes, checksums, then its done flag.
"""

from __future__ import annotations

from lens_cache.errors import DamagedStoreError, MissingLayerError, StoreError
from lens_cache.identity import identity_hash
from lens_cache.store_format import (
    ARRAY_GROUPS,
    ATTRS_KEY,
    BAD_TEXT,
    BITROUND_KEEPBITS,
    BLOCK_CHECKSUM_ARRAY,
    CHECKSUM_ALGORITHM,
    CHECKSUM_SUFFIX,
    COMPRESSIONS,
    DEFAULT_SAM_CHANNELS,
    DIMENSIONS,
    FAILURE_REASONS,
    FORMAT_VERSION,
    INDEX_ARRAYS,
    INDEX_CHUNK,
    MANIFEST_FILE,
    PARTIAL_KEY,
    SAM_EMBEDDING_SIZE,
    SCHEMA,
    STORAGE_DTYPE,
    SUPPORTED_FORMAT_VERSIONS,
    WARM_START_FILE,
    ZSTD_LEVEL,
    ArraySpec,
    StoreArray,
    block_checksum,
    checksum_array_name,
    dimensions,
    expected_arrays,
    image_array_name,
    layout_table,
    manifest_hash,
    sam_embedding_shape,
    sample_arrays,
    store_sample_arrays,
    variants_array_name,
    sample_checksum,
    store_arrays,
    stored_checksums,
    stored_sam_channels,
    text_array_name,
    to_float16,
)
from lens_cache.store_blocks import (
    SCAN_THREADS,
    check_block,
    check_filled,
    missing_blocks,
    scan_store,
    stored_chunk_rows,
    unfilled_blocks,
    unwritten_samples,
)
from lens_cache.store_create import create_store, feature_codecs, index_arrays, manifest_to_parquet_bytes
from lens_cache.store_location import StoreLocation, open_group, quiet_numcodecs, store_state
from lens_cache.store_plan import ImagePlan, plan_images
from lens_cache.store_reader import FeatureStore, check_compatible, require_layer
from lens_cache.store_records import StoreDescription
from lens_cache.store_verify import VerifyReport, failure_lines, verify_store

__all__ = [
    "ARRAY_GROUPS", "ATTRS_KEY", "BAD_TEXT", "BITROUND_KEEPBITS", "BLOCK_CHECKSUM_ARRAY", "CHECKSUM_ALGORITHM", "CHECKSUM_SUFFIX",
    "COMPRESSIONS", "DEFAULT_SAM_CHANNELS", "DIMENSIONS", "FAILURE_REASONS", "FORMAT_VERSION", "INDEX_ARRAYS",
    "INDEX_CHUNK", "MANIFEST_FILE", "PARTIAL_KEY", "SAM_EMBEDDING_SIZE", "SCAN_THREADS", "SCHEMA", "STORAGE_DTYPE",
    "SUPPORTED_FORMAT_VERSIONS", "WARM_START_FILE", "ZSTD_LEVEL",
    "ArraySpec", "DamagedStoreError", "FeatureStore", "ImagePlan", "MissingLayerError", "StoreArray",
    "StoreDescription", "StoreError", "StoreLocation", "VerifyReport",
    "block_checksum", "check_block", "check_compatible", "check_filled", "checksum_array_name", "create_store", "dimensions",
    "expected_arrays", "failure_lines", "feature_codecs", "identity_hash", "image_array_name", "index_arrays",
    "layout_table", "manifest_hash", "manifest_to_parquet_bytes", "missing_blocks", "open_group", "plan_images",
    "quiet_numcodecs", "require_layer", "sam_embedding_shape", "sample_arrays", "sample_checksum", "store_sample_arrays", "variants_array_name", "scan_store",
    "store_arrays", "store_state", "stored_checksums", "stored_chunk_rows", "stored_sam_channels", "text_array_name",
    "to_float16", "unfilled_blocks", "unwritten_samples", "verify_store",
]  # fmt: skip
