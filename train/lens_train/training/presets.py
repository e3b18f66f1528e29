"""The registry of presets: ``paper``, ``official``, ``toy`` and ``tiny`` live as JSON files
beside this module (data, not code); a path to another JSON file of the same shape works too.

A preset names the LENS model and training settings, the MLLM layers it taps (``main``,
and ``late`` for Table 2's "14th -> 30th layer" row), the MLLM it is made for (``made_for``:
the store identity's ``backbone`` and ``hidden_size``) and, for the presets that run on
the synthetic world, the backbones they are matched to (``synthetic``: ``toy`` or ``tiny``).

``lens-train`` without ``--preset`` trains with the preset made for the store's MLLM
(:func:`preset_for_mllm`): ``toy`` for a store of the toy backbones, ``official`` for
LLaVA-1.5-7B, ``qwen2vl-2b`` for Qwen2-VL-2B, ... ``paper`` is made for LLaVA-1.5-7B too but
is never chosen by default: it is the paper's own settings, asked for by name; so is
``official-fp32master`` (``official`` with float32 master weights and clipping). A preset without
``made_for`` is never chosen for a store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lens_cache.errors import UsageError
from lens_core.config import LensConfig

from .config import TrainConfig

PRESET_DIR = Path(__file__).with_name("presets")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: LensConfig
    train: TrainConfig
    main_layer: int = 14
    late_layer: int = 30
    #: {"mllm": ..., "sam": ...} for presets that run on the synthetic world; None for real data
    synthetic: dict | None = None
    #: {"backbone": ..., "hidden_size": ...}: the MLLM this preset is the default for (None: asked by name only)
    made_for: dict | None = None


def load_preset(name_or_path: str, *, model_overrides: dict | None = None, train_overrides: dict | None = None) -> Preset:
    """Load a preset by name (``paper``, ``official``, ``toy``, ``tiny``) or from a JSON path, with overrides."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise UsageError(f"unknown preset {name_or_path!r}: choose one of {available_presets()} or give a .json path")
    raw = json.loads(path.read_text())
    model = {**raw["model"], **(model_overrides or {})}
    train = {**raw["train"], **(train_overrides or {})}
    return Preset(
        name=path.stem,
        description=raw.get("description", ""),
        model=LensConfig.from_dict(model),
        train=TrainConfig.from_dict(train),
        main_layer=int(raw.get("layers", {}).get("main", 14)),
        late_layer=int(raw.get("layers", {}).get("late", 30)),
        synthetic=raw.get("synthetic"),
        made_for=raw.get("made_for"),
    )


def preset_for_mllm(backbone: str | None, hidden_size: int, *, shown_as: str | None = None) -> str:
    """The name of the preset made for an MLLM (``backbone`` as a store identity names it, and its width).

    Raises:
        UsageError: no preset is made for that MLLM (the message names it as ``shown_as`` and says what to pass).
    """
    for name in available_presets():
        made_for = load_preset(name).made_for
        if made_for is not None and made_for == {"backbone": backbone, "hidden_size": hidden_size}:
            return name
    raise UsageError(
        f"no preset is made for this store's MLLM ({shown_as or backbone}, hidden size {hidden_size}): pass "
        f"--preset NAME (one of {available_presets()}) or a preset .json with model.hidden_size {hidden_size}"
    )
