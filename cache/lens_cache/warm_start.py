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

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from lens_cache.backbones.base import FeatureExtractor, NoDecoderLayers
from lens_cache.identity import normalise_json
from lens_cache.store_format import WARM_START_FILE
from lens_cache.store_location import StoreLocation
from lens_core.files import replaced_on_success, sha256_file


def warm_start_layers(layer: int) -> tuple[int, int]:
    """The MLLM's decoder layers (0-based) that warm-start a head reading ``hidden_states[layer]``.

    Decoder layer ``layer`` is the one that reads ``hidden_states[layer]`` (paper 3.1: layers
    14 and 15 for layer-14 features), so an untrained head's first layer computes what the
    MLLM computes next.
    """
    return layer, layer + 1


def warm_start_file(extractor: FeatureExtractor, path: str | Path | None = None) -> dict:
    """The warm-start record of a store cached by ``extractor`` (for each cached layer k, the MLLM's
    decoder layers k and k+1: :func:`warm_start_layers`, each decoder layer saved once), its file
    written to ``path`` (keys ``decoder.<i>.<name>``, ``i`` the 0-based decoder layer).

    The file is written straight from the layers' weights (``safetensors.torch.save_file``) and hashed
    from disk: no copy of the weights is held in memory (on a CPU model the tensors are the model's own).
    At LLaVA-1.5-7B's dimensions the file is 1.6 GB in float32; building it as bytes held three copies
    (the state dicts, ``save``'s buffer and its ``bytes``): 4.6 GB more at the build's peak, measured in
    BENCHMARKS.md. ``path`` None: a temporary file, removed once hashed (the record alone).

    Returns:
        the record ``{"file", "sha256", "head": sizes, "by_layer": {"k": [k, k + 1] or None},
        "layers": the first layer's pair or None}`` (plus ``"reason"`` when the first layer has
        none); or ``{"layers": None, "reason": why}`` (no file written) when no cached layer has its
        two layers in the MLLM (``k`` is its last layer, or it exposes none).
    """
    from safetensors.torch import save_file

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
        return {"layers": None, "reason": reasons[first]}
    with contextlib.ExitStack() as stack:
        if path is None:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lens-warm-start-"))) / WARM_START_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        digest = sha256_file(path)
    record = {"file": WARM_START_FILE, "layers": by_layer[str(first)], "by_layer": by_layer,
              "sha256": digest, "head": head}
    if first in reasons:
        record["reason"] = reasons[first]
    return record


def write_warm_start(extractor: FeatureExtractor, location: StoreLocation, record: dict) -> None:
    """Write the warm-start file that ``record`` (the store's ``identity["warm_start"]``) describes.

    Written under a temporary name (beside the store where it is local, in a temporary folder otherwise),
    checked against ``record``, then renamed into place (uploaded where remote); nothing when the record
    holds none.

    Raises:
        RuntimeError: the extractor's layers are not the ones the record was made from.
    """
    if record.get("file") is None:
        ours = warm_start_file(extractor)
        _check_same(ours, record)
        return
    with contextlib.ExitStack() as stack:
        if location.is_local:
            final = location.local_path / WARM_START_FILE
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(replaced_on_success(final))  # renamed only if the block succeeds
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lens-warm-start-"))) / "file"
        _check_same(warm_start_file(extractor, tmp), record)
        if not location.is_local:
            location.put_file(tmp, WARM_START_FILE)


def _check_same(ours: dict, record: dict) -> None:
    if normalise_json(ours) != normalise_json(record):
        raise RuntimeError(f"the backbone's warm start {ours} is not the one the store records ({record})")
