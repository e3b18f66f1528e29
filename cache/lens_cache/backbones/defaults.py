"""Per-backbone defaults, in one table: which layers stage 1 caches, the warm start, the grid, the preset.

One row per MLLM family (keyed by the checkpoint's ``config.model_type``) and per built-in MLLM (keyed by its
``--mllm`` name). ``lens-cache build`` without ``--layers`` caches the row's main layer
(:func:`default_layers`), which is the ``layers.main`` of the training preset the row names, so the store it
writes is one ``lens-train`` accepts; ``tests/test_cache_fidelity_defaults.py`` checks every row against its
preset (``train/lens_train/training/presets/*.json``: ``layers``, ``made_for``, ``model.grid_size``).

Another package's adapter adds its rows with :func:`register_backbone_defaults` (this module is not edited).
An MLLM with no row caches :data:`DEFAULT_LAYER`.

Importing this module is cheap: transformers is imported only to read a checkpoint's config.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The layer cached for an MLLM without a row: LLaVA-1.5-7B's layer 14, as in the paper.
DEFAULT_LAYER = 14


@dataclass(frozen=True)
class BackboneDefaults:
    """The defaults of one backbone.

    Attributes:
        backbone: ``identity["backbone"]`` of its adapter (``llava-1.5``, ``qwen2-vl``, ...), the preset's
            ``made_for.backbone``.
        main_layer: the layer stage 1 caches by default and the head reads (``hidden_states`` index).
        late_layer: the preset's late layer (``layers.late``), or None where no preset is made for it.
        warm_start: the two decoder layers (0-based) that warm-start the head: main and main + 1.
        grid_size: side of the cached image-token grid (24 x 24 = 576 for LLaVA-1.5).
        preset: the training preset made for it (``lens_train.training.presets``), or None.
        hidden_size: the MLLM's width (the preset's ``made_for.hidden_size``).
    """

    backbone: str
    main_layer: int
    late_layer: int | None
    warm_start: tuple[int, int]
    grid_size: int
    preset: str | None
    hidden_size: int

    @property
    def layers(self) -> tuple[int, ...]:
        """``lens-cache build``'s default ``--layers``: the main layer."""
        return (self.main_layer,)


def _row(backbone: str, main: int, late: int | None, grid: int, preset: str | None, hidden: int) -> BackboneDefaults:
    return BackboneDefaults(backbone, main, late, (main, main + 1), grid, preset, hidden)


#: Checkpoints, by ``config.model_type``. Qwen2-VL's main layer 20 and OneVision's 14 (warm start k, k + 1) are the
#: authors' (jiazhen-code/LENS ``configs/qwen2vl_2b.yaml``, ``configs/llava_onevision_7b.yaml``: ``selected_layer_id``
#: = ``grounding_init_start_layer``); the late layers (the last decoder layer) are this project's. Qwen2.5-VL's
#: layers are a guess (the authors have no Qwen2.5-VL run; no weights here): ``lens-cache probe-layers`` ranks them.
MODEL_TYPE_DEFAULTS: dict[str, BackboneDefaults] = {
    "llava": _row("llava-1.5", 14, 30, 24, "official", 4096),
    "qwen2_vl": _row("qwen2-vl", 20, 27, 24, "qwen2vl-2b", 1536),
    "qwen2_5_vl": _row("qwen2.5-vl", 26, 35, 24, "qwen25vl-3b", 2048),
    "llava_onevision": _row("llava-onevision", 14, 27, 27, "onevision-7b", 3584),
}

#: Built-in MLLMs, by ``--mllm`` name: the shipped toy LLaVA and the random tiny models built in code (only
#: the tiny LLaVA has a preset; the other tiny ones cache layer 14 of their 28).
BUILTIN_DEFAULTS: dict[str, BackboneDefaults] = {
    "toy": _row("llava-1.5", 3, 4, 24, "toy", 128),
    "tiny": _row("llava-1.5", 14, 30, 24, "tiny", 64),
    "tiny-qwen2vl": _row("qwen2-vl", 14, None, 24, None, 64),
    "tiny-qwen2.5vl": _row("qwen2.5-vl", 14, None, 24, None, 64),
    "tiny-qwen25vl": _row("qwen2.5-vl", 14, None, 24, None, 64),
    "tiny-onevision": _row("llava-onevision", 14, None, 27, None, 64),
}


def register_backbone_defaults(
    row: BackboneDefaults, *, model_type: str | None = None, builtin: str | None = None
) -> None:
    """Add ``row`` for checkpoints of ``model_type`` and/or the built-in MLLM ``builtin`` (an adapter module
    calls it beside ``register_mllm_adapter``)."""
    if model_type is not None:
        MODEL_TYPE_DEFAULTS[model_type] = row
    if builtin is not None:
        BUILTIN_DEFAULTS[builtin] = row


def defaults_for(mllm: str) -> BackboneDefaults | None:
    """The row of ``--mllm MLLM``: a built-in name, else the ``model_type`` of the checkpoint's config (a
    local folder or an HF-cache name, read offline); None when it has none or its config cannot be read
    (the loader then says why)."""
    if mllm in BUILTIN_DEFAULTS:
        return BUILTIN_DEFAULTS[mllm]
    from lens_cache.errors import UserError

    from .mllm import load_mllm_config

    try:
        model_type = load_mllm_config(mllm).model_type
    except UserError:
        return None
    return MODEL_TYPE_DEFAULTS.get(model_type)


def default_layers(mllm: str) -> tuple[int, ...]:
    """The layers ``lens-cache build --mllm MLLM`` caches when ``--layers`` is not given: its row's main layer
    (the ``layers.main`` of the preset made for it), else :data:`DEFAULT_LAYER`."""
    row = defaults_for(mllm)
    return row.layers if row is not None else (DEFAULT_LAYER,)
