"""Reading a feature store: :class:`FeatureStore`, the one layer check, and which stores may be mixed.

What stage 2 (``lens_train``'s datasets, evaluation, live segmentation) and ``lens-cache
info``/``verify``/``export`` use. A reader refuses a store that is missing, foreign, of an unsupported
format version or (unless asked) unfinished, and checks every sample against its checksum as it reads
it (a damaged one is a one-line :class:`~lens_cache.errors.DamagedStoreError` naming the repair):
:class:`FeatureStore` is :class:`lens_cache.store_checked.CheckedStore` (attributes and checked arrays)
plus opening, the manifest and warm start the store was built with, the prompt's prefix, the question
templates, the skipped samples and one image's or query's features. The build's block bookkeeping
(which blocks are done or damaged) is :mod:`lens_cache.store_blocks`; the arrays are those of
:data:`lens_cache.store_format.SCHEMA`; the contract is :mod:`lens_cache.store`'s docstring.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from lens_cache.errors import DamagedStoreError, MissingLayerError, StoreError
from lens_cache.identity import feature_differences, format_differences
from lens_cache.store_checked import CheckedStore
from lens_cache.store_format import (
    ATTRS_KEY,
    BAD_TEXT,
    FAILURE_REASONS,
    MANIFEST_FILE,
    SAM_EMBEDDINGS,
    SUPPORTED_FORMAT_VERSIONS,
    VARIANT_TEXT_LEN,
    WARM_START_FILE,
    image_array_name,
    manifest_hash,
    prefix_array_name,
    stored_prefix,
    stored_text_variants,
    text_array_name,
    variant_slots,
    variants_array_name,
)
from lens_cache.store_location import StoreLocation, open_group, store_state


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


class FeatureStore(CheckedStore):
    """A finished (or, on request, unfinished) feature store, opened for reading.

    Stage 2 reads it through :meth:`read_query` / :meth:`read_image`; ``lens-cache info``, ``verify`` and
    ``export`` through the rest. A build reopens it to resume (:mod:`lens_cache.store_writer`), keeps
    track of its blocks with :mod:`lens_cache.store_blocks` and writes through
    :class:`lens_cache.block_writer.BlockWriter` (which opens the group ``r+``). Pickles as its URL (each
    DataLoader worker reopens it).
    """

    # -- opening -------------------------------------------------------------

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
            done = int(store.done_flags().sum())
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

    # -- what it was built with: the manifest, the warm start ----------------

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

    # -- the prompt's tokens before the image (format version 4) -------------

    @property
    def prefix_token_ids(self) -> list[int] | None:
        """The P_pre token ids of the prompt before its first image token (BOS, system prompt, ``USER:``),
        or None for a store without prefix states (format version 3 or older, or a backbone that gives none)."""
        prefix = stored_prefix(self._attrs)
        return None if prefix is None else [int(t) for t in prefix["token_ids"]]

    def prefix_states(self, layer: int) -> np.ndarray | None:
        """(P_pre, d) float32: the MLLM's layer-``layer`` states of the prompt's tokens before the image
        (the same for every image of a causal MLLM, so stored once), checked against their checksum;
        None for a store without them (see :attr:`prefix_token_ids`).

        Raises:
            MissingLayerError: the store does not cache ``layer``.
            DamagedStoreError: the array does not decode or its bytes changed.
        """
        require_layer(self.layers, layer, holder=f"store {self.url}")
        if stored_prefix(self._attrs) is None:
            return None
        return self.checked_index_array(prefix_array_name(int(layer))).astype(np.float32)

    # -- question templates (format version 5) -------------------------------

    @property
    def text_variants(self) -> dict | None:
        """``attrs["text_variants"]`` (``question_set``, ``count``, ``max_len``, ``names``), or None for a store of
        format version 4 or older or one built by an extractor without a question set (one question per query)."""
        record = stored_text_variants(self._attrs)
        return None if record is None else json.loads(json.dumps(record))

    @property
    def question_set(self) -> str:
        """The name of the question-template set the store was built with (``authors``, ``single``, ...);
        ``single`` for a store without a record (one question per query, the rule before sets existed)."""
        record = stored_text_variants(self._attrs)
        return str(record["question_set"]) if record else "single"

    @property
    def max_text_variants(self) -> int:
        """The most text variants any query of the store has (1: one question per query)."""
        return 1 + variant_slots(self._attrs)

    @cached_property
    def variant_text_len(self) -> np.ndarray:
        """(N_q, V_t) int32: L_t of each query's variant v + 1 (column v); 0 where its kind has no such
        variant, -1 where the build refused its text. (N_q, 0) for a store with one question per query."""
        if not variant_slots(self._attrs):
            return np.zeros((self.num_queries, 0), dtype=np.int32)
        return self.checked_index_array(VARIANT_TEXT_LEN)

    def num_text_variants(self, query_id: int) -> int:
        """How many question templates query ``query_id`` was cached with: variant 0 (the evaluation
        question) and its kind's training questions (variants 1..). 1 for a store of format 4 or older."""
        if not 0 <= query_id < self.num_queries:
            raise IndexError(f"query {query_id} out of range (store has {self.num_queries})")
        return 1 + int(np.count_nonzero(self.variant_text_len[query_id]))

    @property
    def text_variant_templates(self) -> dict[str, list[str]]:
        """Kind (``short``, ``sentence``) -> one line per variant naming its template and normalisation
        (variant 0 first: ``eval (strip): 'What is {text} in this image?'``, then ``train 1 (lower): ...``)."""
        record = stored_text_variants(self._attrs)
        if record and record.get("names"):
            return {kind: list(lines) for kind, lines in record["names"].items()}
        template = self.identity.get("question_template")
        short = f"eval and train: {template!r}" if template else "eval and train: the backbone's question rule"
        return {"short": [short], "sentence": ["eval and train: '{text}'"]}

    def text_variant_names(self, query_id: int) -> list[str]:
        """Which template each variant of query ``query_id`` is (its kind's lines of :attr:`text_variant_templates`)."""
        count = self.num_text_variants(query_id)
        kind = "sentence" if bool(self._is_sentence[query_id]) else "short"
        return self.text_variant_templates[kind][:count]

    @cached_property
    def _is_sentence(self) -> np.ndarray:
        return np.asarray(self.unchecked_manifest().column("is_sentence").to_pylist(), dtype=bool)

    # -- skipped samples -----------------------------------------------------

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

    # -- reading samples -----------------------------------------------------

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
        end = self._query_end(image)
        return {
            "image_states": self.read_sample(image_array_name(layer), image),
            "sam_embedding": self.read_sample(SAM_EMBEDDINGS.name, image),
            "original_size": self._original_size[image].astype(np.int64),
            "input_size": self._input_size[image].astype(np.int64),
            "image_index": int(image),
            "query_ids": np.arange(first, end, dtype=np.int64),
        }

    def read_query(self, query: int, layer: int, variant: int = 0) -> dict[str, Any]:
        """Everything stage 2 needs for one query.

        Args:
            variant: which question's text states: 0 the evaluation question, 1.. the training questions
                of the store's question set, in its order (:meth:`num_text_variants`, :meth:`text_variant_names`).

        Returns:
            image_states: (576, d) float16; text_states: (L_t, d) float16 (the last
            row is the start-of-answer token); sam_embedding: (C, 64, 64) float16;
            original_size, input_size: (2,) int (h, w); image_index: int; query_id: int.

        Raises:
            IndexError: no such query, or no such variant of it (the message says how many it has).
            StoreError: the query, or this variant of it, was refused at build time.
        """
        if not 0 <= query < self.num_queries:
            raise IndexError(f"query {query} out of range (store has {self.num_queries})")
        count = self.num_text_variants(query)
        if not 0 <= int(variant) < count:
            raise IndexError(
                f"query {query} of store {self.url} has {count} text variant(s) (0..{count - 1}, question set "
                f"{self.question_set!r}), not {variant}")
        if variant and int(self.variant_text_len[query, variant - 1]) < 0 and int(self.text_len[query]) > 0:
            raise StoreError(
                f"variant {variant} of query {query} of store {self.url} was refused at build time (its question "
                "is too long for the MLLM or holds a special token): use another variant")
        image = int(self.image_index[query])
        if int(self.text_len[query]) == 0 and not self.image_failures[image]:
            raise StoreError(
                f"query {query} of store {self.url} was skipped at build time ({FAILURE_REASONS[BAD_TEXT]}); "
                "iterate over store.valid_query_ids() instead"
            )
        sample = self.read_image(image, layer)
        del sample["query_ids"]
        if variant:
            length = int(self.variant_text_len[query, variant - 1])
            sample["text_states"] = self.read_sample(variants_array_name(layer), query)[variant - 1, :length]
        else:
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
