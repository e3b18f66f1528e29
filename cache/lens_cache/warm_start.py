"""The head's warm start a store keeps beside its features: the MLLM's decoder layers k and k + 1.

For each cached layer k, a LENS head reading ``hidden_states[k]`` starts as the MLLM's decoder layers
k and k + 1 (paper 3.1; :func:`warm_start_layers`). A build saves them once per store, each decoder
layer once, as ``warm_start/decoder_layers.safetensors`` (:func:`warm_start_file`), and records the
file (layers, sha256, the head sizes it fits) in the store's identity (``identity["warm_start"]``,
through :mod:`lens_cache.extractor_info`), so the file is part of what identifies the store. The
parent writes it before any block (:func:`write_warm_start`, from :mod:`lens_cache.build`); a
reader checks its hash before using it (:meth:`lens_cache.store_reader.FeatureStore.warm_start_bytes`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from lens_cache.backbones.base import FeatureExtractor, NoDecoderLayers
from lens_cache.identity import normalise_json
from lens_cache.store_format import WARM_START_FILE
from lens_cache.store_location import StoreLocation


def warm_start_layers(layer: int) -> tuple[int, int]:
    """The MLLM's decoder layers (0-based) that warm-start a head reading ``hidden_states[layer]``.

    Decoder layer ``layer`` is the one that reads ``hidden_states[layer]`` (paper 3.1: layers
    14 and 15 for layer-14 features), so an untrained head's first layer computes what the
    MLLM computes next.
    """
    return layer, layer + 1


def warm_start_file(extractor: FeatureExtractor) -> tuple[dict, bytes | None]:
    """The warm-start record and file of a store cached by ``extractor``: for each cached layer k, the
    MLLM's decoder layers k and k+1 (:func:`warm_start_layers`), each decoder layer saved once.

    Returns:
        the record ``{"file", "sha256", "head": sizes, "by_layer": {"k": [k, k + 1] or None},
        "layers": the first layer's pair or None}`` (plus ``"reason"`` when the first layer has
        none) and the safetensors bytes (keys ``decoder.<i>.<name>``, ``i`` the 0-based decoder
        layer); or ``{"layers": None, "reason": why}`` and None when no cached layer has its
        two layers in the MLLM (``k`` is its last layer, or it exposes none).
    """
    from safetensors.torch import save

    tensors: dict[str, Any] = {}  # name -> torch.Tensor (torch is imported by the extractor, not here)
    by_layer: dict[str, list[int] | None] = {}
    reasons: dict[int, str] = {}
    head = None
    for layer in extractor.layers:
        pair = warm_start_layers(layer)
        try:
            head, state_dicts = extractor.decoder_layers(pair)
        except NoDecoderLayers as why:
            by_layer[str(layer)] = None
            reasons[layer] = f"no warm start for layer {layer}: {why}"
            continue
        by_layer[str(layer)] = list(pair)
        for index, state in zip(pair, state_dicts):
            tensors.update({f"decoder.{index}.{name}": t.contiguous() for name, t in state.items()})
    first = extractor.layers[0]
    if not tensors:
        return {"layers": None, "reason": reasons[first]}, None
    data = save(tensors)
    record = {"file": WARM_START_FILE, "layers": by_layer[str(first)], "by_layer": by_layer,
              "sha256": hashlib.sha256(data).hexdigest(), "head": head}
    if first in reasons:
        record["reason"] = reasons[first]
    return record, data


def write_warm_start(extractor: FeatureExtractor, location: StoreLocation, record: dict) -> None:
    """Write the warm-start file that ``record`` (the store's ``identity["warm_start"]``) describes.

    Written atomically (temporary name + rename where local); nothing when the record holds none.

    Raises:
        RuntimeError: the extractor's layers are not the ones the record was made from.
    """
    ours, data = warm_start_file(extractor)
    if normalise_json(ours) != normalise_json(record):
        raise RuntimeError(f"the backbone's warm start {ours} is not the one the store records ({record})")
    if data is not None:
        location.write_bytes(WARM_START_FILE, data)
