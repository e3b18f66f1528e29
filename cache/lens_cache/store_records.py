"""What a build records in a store beside its arrays: the prefix, the question templates, what the store is.

The extractor's description (:mod:`lens_cache.extractor_info`) gives a build the
:class:`StorePrefix` (the prompt's tokens before the image, stored once: format version 4) and
the :class:`StoreVariants` (the question templates of every query: format version 5); creation
(:mod:`lens_cache.store_create`) writes them into ``attrs["prefix"]``, ``attrs["text_variants"]`` and
their arrays. :class:`StoreDescription` is what a store is (identity, layers, sizes, manifest,
block size, compression): a build creates a store from it and resumes only a store that has the
same one (:func:`lens_cache.store_writer.refuse_if_different`). The arrays are named by
:mod:`lens_cache.store_format`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from lens_cache.identity import normalise_json
from lens_cache.store_format import prefix_array_name


# ----------------------------------------------------------------------------- the prefix


@dataclass(frozen=True)
class StorePrefix:
    """What a build stores once for the prompt's tokens before the image (format version 4).

    Attributes:
        token_ids: the P_pre token ids (BOS, system prompt, ``USER:``), recorded in ``attrs["prefix"]``.
        states: layer -> (P_pre, d) float16, as stored in ``prefix/mllm_l{L}``.
    """

    token_ids: tuple[int, ...]
    states: dict[int, np.ndarray]

    def record(self) -> dict:
        """``attrs["prefix"]``."""
        return {"length": len(self.token_ids), "token_ids": [int(t) for t in self.token_ids]}

    def arrays(self) -> dict[str, np.ndarray]:
        """Array name -> stored values."""
        return {prefix_array_name(layer): values for layer, values in self.states.items()}


# ----------------------------------------------------------------------------- text variants


@dataclass(frozen=True)
class StoreVariants:
    """What a build records about the question templates of its queries (format version 5).

    Attributes:
        question_set: the set's name; names: kind (``short``, ``sentence``) -> one line per variant.
        count: the most variants of any query (1: one question per query, no variant arrays).
        lengths: (N_q, count - 1) int32, L_t of each query's variant v + 1 (column v): 0 where its kind has
            no such variant, -1 where the backbone refused the text (or the query's variant 0 was refused).
    """

    question_set: str
    names: dict
    count: int
    lengths: np.ndarray

    @property
    def max_len(self) -> int:
        return max(1, int(self.lengths.max())) if self.lengths.size else 0

    def record(self) -> dict:
        """``attrs["text_variants"]``."""
        return {"question_set": self.question_set, "count": int(self.count), "max_len": self.max_len,
                "names": self.names}


# ----------------------------------------------------------------------------- self-description


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
