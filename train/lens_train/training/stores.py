"""Opening the feature stores a run reads, and everything stage 2 derives from them.

Each check turns a mistake into one line that says what to do: stores of different
backbones, a layer the store does not hold, a preset whose hidden size or prompt width
is not the store's, an unfinished store (``FeatureStore.open``), the SAM whose mask
decoder belongs to the cached image embeddings, and a warm start that does not fit the
head or is not the file the store was built with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load

from lens_core import LensConfig

from ..errors import UserError
from .presets import available_presets, load_preset, preset_for_mllm

#: Head settings that must equal the store's warm-start layers' (else they cannot be loaded):
#: sizes, and the layer's parameter layout (``layer_type``: biases; ``num_key_value_heads``: k/v widths).
WARM_START_SHAPE_FIELDS = ("hidden_size", "num_heads", "mlp_size", "layer_type", "num_key_value_heads")


def _warm_start_setting(head: dict, key: str):
    """A head setting as a store's warm-start record states it; a record written before ``layer_type``
    and ``num_key_value_heads`` existed means LLaMA layers with multi-head attention (LLaVA-1.5)."""
    if key == "layer_type":
        return head.get("layer_type", "llama")
    if key == "num_key_value_heads":
        return head.get("num_key_value_heads") or head["num_heads"]
    return head[key]


def _config_setting(config: LensConfig, key: str):
    """A head setting of ``config``, ``num_key_value_heads`` resolved (None = num_heads)."""
    return config.kv_heads if key == "num_key_value_heads" else getattr(config, key)


def open_stores(urls: Sequence[str], *, layer: int, hidden_size: int, prompt_dim: int, preset_name: str,
                grid_size: int | None = None):
    """Open complete stores that can be trained on together with a preset.

    Raises:
        StoreError: a store is missing, foreign, unfinished, its manifest file was changed
            (DamagedStoreError), the stores were cached with different backbones (the
            message names the settings that differ), or one does not cache ``layer``
            (MissingLayerError).
        UserError: the preset's hidden size / prompt width / image grid is not the store's (``prompt_dim``
            must be the C of its (C, 64, 64) SAM embeddings; ``grid_size`` squared its number of image tokens:
            24 x 24 = 576 for LLaVA-1.5 and Qwen2-VL at 672 px, 27 x 27 = 729 for LLaVA-OneVision).
    """
    from lens_cache.store import FeatureStore, check_compatible, require_layer  # zarr: loaded when a store is opened

    if not urls:
        raise UserError("give at least one --cache STORE")
    stores = [FeatureStore.open(url) for url in urls]
    for store in stores:
        store.manifest  # noqa: B018 - manifest.parquet is the one the store recorded (else DamagedStoreError)
    check_compatible(stores)
    shared = sorted(set.intersection(*(set(store.layers) for store in stores)))
    fix = f"pass --layer {shared[0]}" if shared else f"cache layer {layer} in every store (lens-cache build --layers)"
    for store in stores:
        require_layer(store.layers, layer, holder=f"store {store.url}", fix=fix)
    reference = stores[0]
    if reference.hidden_size != hidden_size:
        raise UserError(
            f"store {reference.url} was built with d={reference.hidden_size} ({backbone_name(reference.identity)} "
            f"backbone) but preset {preset_name!r} expects {hidden_size}: {preset_hint(reference.hidden_size)}"
        )
    if grid_size is not None and reference.num_image_tokens != grid_size**2:
        side = round(reference.num_image_tokens**0.5)
        fix = (f"give a preset with model.grid_size {side}" if side**2 == reference.num_image_tokens
               else "cache a square grid of image tokens (for LLaVA: vision_feature_select_strategy 'default')")
        raise UserError(
            f"store {reference.url} holds {reference.num_image_tokens} image tokens per image but preset "
            f"{preset_name!r} reads a {grid_size} x {grid_size} grid ({grid_size**2}): {fix}"
        )
    if reference.sam_channels != prompt_dim:
        raise UserError(
            f"store {reference.url} holds {reference.sam_channels}-channel SAM embeddings but preset "
            f"{preset_name!r} has prompt_dim {prompt_dim}: give a preset with model.prompt_dim {reference.sam_channels}"
        )
    return stores


def refuse_output_in_a_store(out: str | Path) -> None:
    """Refuse, in one line, a run or evaluation folder that is a feature store or lies inside one.

    Raises:
        UserError: ``out`` is (inside) a store: its ``lens-cache build --overwrite`` would delete the output.
    """
    from lens_cache.store_location import store_around

    store = store_around(out)
    if store is not None:
        raise UserError(f"--out {out} is inside the feature store {store}: write runs and evaluations outside it "
                        "(choose another --out)")


def require_prefix(store, *, layer: int, config: LensConfig) -> None:
    """Refuse, in one line, a store without the pre-image prefix states for a head that reads them.

    Raises:
        UserError: ``config.head_input`` is ``full_sequence`` and ``store`` keeps no prefix (built before
            store format 4).
    """
    if config.head_input == "full_sequence" and store.prefix_states(layer) is None:
        raise UserError(
            f"store {store.url} keeps no states of the prompt's tokens before the image, which a head with "
            "head_input full_sequence (the official preset) reads: rebuild it with this lens-cache "
            "(lens-cache build --overwrite), or use --set head_input=image_text"
        )


def default_preset(urls: Sequence[str]) -> str:
    """The preset made for the MLLM of the first store (``lens-train`` without ``--preset``)."""
    from lens_cache.store import FeatureStore

    if not urls:
        raise UserError("give at least one --cache STORE")
    store = FeatureStore.open(urls[0])
    return preset_for_mllm(store.identity.get("backbone"), store.hidden_size, shown_as=backbone_name(store.identity))


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


def resolve_sam_spec(identity: dict, sam: str | None) -> str:
    """The ``build_sam`` spec of the SAM a store was cached with.

    A tiny SAM is rebuilt from code. A real SAM's checkpoint path is not part of the
    identity (moving a file does not change a cache), so ``sam`` must name it and its
    weights must hash to what the store recorded. A toy SAM store defaults to the shipped
    toy weights (``toy``), under the same check.

    Args:
        identity: the store's identity; ``identity["sam"]`` holds ``variant`` and ``weights``.
        sam: ``--sam`` (``vit_h:PATH``, ``toy:PATH``), or None.
    Raises:
        UserError: no SAM given for a real-SAM store, or the given one is another SAM.
    """
    from lens_cache.backbones.sam import parse_sam_spec, sam_identity  # segment_anything: loaded when needed

    recorded = identity.get("sam") or {}
    variant = recorded.get("variant")
    if variant is None:
        raise UserError(f"the store's identity records no SAM variant (sam = {recorded}): it was not built by lens-cache")
    if variant == "tiny":
        if sam not in (None, "tiny"):
            raise UserError(f"the store was cached with the tiny SAM, not {sam}: drop --sam")
        return "tiny"
    if sam is None and variant == "toy":
        sam = "toy"
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


@dataclass(frozen=True)
class WarmStart:
    """The head's warm start as a store holds it.

    Attributes:
        layers: the MLLM's decoder layers (0-based), ``(k, k + 1)`` for layer-k features.
        state_dicts: their two decoder-layer state dicts (``LlamaDecoderLayer`` / ``Qwen2DecoderLayer``),
            for ``SegmentationHead.load_decoder_layers``.
        notes: head settings that differ from the MLLM's (the head loads, but is not exactly those layers).
    """

    layers: tuple[int, int]
    state_dicts: list[dict[str, torch.Tensor]]
    notes: tuple[str, ...] = ()


def read_warm_start(store, *, layer: int, config: LensConfig) -> WarmStart | str:
    """The MLLM's decoder layers k, k+1 a store holds for a head reading its layer ``layer``.

    Returns:
        the :class:`WarmStart`, or why there is none to use (one line for the log): the
        store holds none, or holds the layers for another layer than ``layer``.
    Raises:
        UserError: the layers do not fit ``config`` (hidden size, heads, MLP size), or the
            file is missing or not the one the store recorded (its sha256 differs).
    """
    from lens_cache.store import WARM_START_FILE, StoreError  # zarr: loaded when a store is opened

    record = store.warm_start
    by_layer = record.get("by_layer")
    if by_layer is None:  # format 2: the first layer's pair only
        if record["layers"] is None:
            return f"store {store.url} holds no decoder-layer weights ({record['reason']})"
        if record["layers"][0] != layer:
            first, second = record["layers"]
            return (f"store {store.url} holds the MLLM's decoder layers {first}-{second}, for layer-{first} features, "
                    f"not layer {layer}")
        pair = tuple(record["layers"])
    else:
        if by_layer.get(str(layer)) is None:
            why = "it caches no such layer" if str(layer) not in by_layer else "the MLLM has no decoder layer after it"
            return f"store {store.url} holds no decoder-layer weights for layer {layer} ({why})"
        pair = tuple(by_layer[str(layer)])
    first, second = pair
    head = record["head"]
    wrong = [f"{key} {_warm_start_setting(head, key)} (preset: {_config_setting(config, key)})"
             for key in WARM_START_SHAPE_FIELDS if _warm_start_setting(head, key) != _config_setting(config, key)]
    if wrong:
        raise UserError(f"store {store.url} holds decoder layers of " + ", ".join(wrong)
                        + ": use a preset of the MLLM's sizes or --no-warm-start")
    notes = tuple(f"{key} ({getattr(config, key)} vs {value})" for key, value in head.items()
                  if key not in WARM_START_SHAPE_FIELDS and getattr(config, key) != value)
    try:
        data = store.warm_start_bytes()
    except StoreError as error:
        raise UserError(str(error)) from None
    tensors = load(data)
    # format 3: decoder.<i>.<name>, i the MLLM's decoder layer; format 2: layers.<0|1>.<name>
    prefixes = (f"decoder.{first}.", f"decoder.{second}.") if by_layer is not None else ("layers.0.", "layers.1.")
    layers: list[dict[str, torch.Tensor]] = [
        {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)} for prefix in prefixes]
    if not all(layers):
        raise UserError(f"{store.url}/{WARM_START_FILE}: no {' / '.join(p + '*' for p in prefixes)} keys: "
                        "rebuild the store with --overwrite")
    return WarmStart(layers=(first, second), state_dicts=layers, notes=notes)
