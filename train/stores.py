"""Opening the feature stores a run reads, and everything stage 2 derives from them.

Each check turns a mistake into one line that says what to do: stores of different
backbones, a layer the store does not hold, a preset whose hidden size is not the
store's, an unfinished store (``FeatureStore.open``), and the SAM whose mask decoder
belongs to the cached image embeddings.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from .errors import UserError
from .presets import available_presets, load_preset

#: Where a store may hold the MLLM's decoder layers 14-15 for the head's warm start
#: (safetensors, keys ``layers.0.<LlamaDecoderLayer name>`` and ``layers.1.<...>``).
#: Stage 1 does not write it yet; when it is absent the head starts from random init.
WARM_START_FILE = "warm_start/decoder_layers.safetensors"


def open_stores(urls: Sequence[str], *, layer: int, hidden_size: int, preset_name: str):
    """Open complete stores that can be trained on together with a preset.

    Raises:
        StoreError: a store is missing, foreign, unfinished, or the stores were cached
            with different backbones (the message names the settings that differ).
        UserError: ``layer`` is not cached, or the preset's hidden size is not the store's.
    """
    from lens_cache.store import FeatureStore, check_compatible

    if not urls:
        raise UserError("give at least one --cache STORE")
    stores = [FeatureStore.open(url) for url in urls]
    check_compatible(stores)
    reference = stores[0]
    if layer not in reference.layers:
        have = ", ".join(str(x) for x in reference.layers)
        raise UserError(f"store {reference.url} caches layer(s) {have}, not {layer}: pass --layer {reference.layers[0]}")
    if reference.hidden_size != hidden_size:
        raise UserError(
            f"store {reference.url} was built with d={reference.hidden_size} ({backbone_name(reference.identity)} "
            f"backbone) but preset {preset_name!r} expects {hidden_size}: {preset_hint(reference.hidden_size)}"
        )
    return stores


def backbone_name(identity: dict) -> str:
    """A short name of the MLLM a store was cached with (``tiny``, ``llava-hf/llava-1.5-7b-hf``)."""
    name = identity.get("name_or_path") or identity.get("mllm", {}).get("name") or identity.get("backbone")
    return str(name or "unknown")


def preset_hint(hidden_size: int) -> str:
    """``use --preset tiny`` for the built-in presets of that size, else how to make one."""
    matching = [name for name in available_presets() if load_preset(name).model.hidden_size == hidden_size]
    if matching:
        return "use --preset " + " or --preset ".join(matching)
    return f"give --preset PATH.json with model.hidden_size {hidden_size}"


def describe_store(store) -> dict[str, Any]:
    """What a run records about each store it read (config.json)."""
    return {
        "url": store.url,
        "identity_hash": store.identity_hash,
        "manifest_hash": store.manifest_hash,
        "spec": store.attrs.get("spec"),
        "layers": list(store.layers),
        "num_queries": store.num_queries,
        "num_valid_queries": int(len(store.valid_query_ids())),
        "identity": store.identity,
    }


def resolve_sam_spec(identity: dict, sam: str | None) -> str:
    """The ``build_sam`` spec of the SAM a store was cached with.

    A tiny SAM is rebuilt from code. A real SAM's checkpoint path is not part of the
    identity (moving a file does not change a cache), so ``sam`` must name it and its
    weights must hash to what the store recorded.

    Args:
        identity: the store's identity; ``identity["sam"]`` holds ``variant`` and ``weights``.
        sam: ``--sam`` (``vit_h:PATH``), or None.
    Raises:
        UserError: no SAM given for a real-SAM store, or the given one is another SAM.
    """
    from lens_cache.backbones.sam import parse_sam_spec, sam_identity

    recorded = identity.get("sam") or {}
    variant = recorded.get("variant")
    if variant is None:
        raise UserError(f"the store's identity records no SAM variant (sam = {recorded}): it was not built by lens-cache")
    if variant == "tiny":
        if sam not in (None, "tiny"):
            raise UserError(f"the store was cached with the tiny SAM, not {sam}: drop --sam")
        return "tiny"
    if sam is None:
        raise UserError(
            f"the store was cached with SAM {variant} (weights {str(recorded.get('weights'))[:19]}...): "
            f"pass --sam {variant}:PATH to that checkpoint"
        )
    parsed = parse_sam_spec(sam)
    if parsed.variant != variant:
        raise UserError(f"the store was cached with SAM {variant}, but --sam names a {parsed.variant}")
    given = sam_identity(sam)
    if given["weights"] != recorded.get("weights"):
        raise UserError(
            f"--sam {sam} has weights {given['weights'][:19]}..., the store was cached with "
            f"{str(recorded.get('weights'))[:19]}...: pass the SAM checkpoint the store was built with"
        )
    return sam


def read_warm_start(store) -> list[dict[str, torch.Tensor]] | None:
    """The MLLM's decoder layers 14-15 (two ``LlamaDecoderLayer`` state dicts) if the store holds them."""
    from safetensors.torch import load

    try:
        raw = store.location.read_bytes(WARM_START_FILE)
    except (FileNotFoundError, OSError):
        return None
    tensors = load(io.BytesIO(raw).getvalue())
    layers: list[dict[str, torch.Tensor]] = [{}, {}]
    for key, value in tensors.items():
        prefix, _, name = key.partition(".")[2].partition(".")
        if not key.startswith("layers.") or prefix not in ("0", "1"):
            raise UserError(f"{store.url}/{WARM_START_FILE}: unexpected key {key!r} (want layers.0.* and layers.1.*)")
        layers[int(prefix)][name] = value
    return layers
