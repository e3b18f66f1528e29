"""The registry of presets: ``paper``, ``official``, ``toy`` and ``tiny`` live as JSON files
beside this module (data, not code); a path to another JSON file of the same shape works too.

A preset names the LENS model and training settings, the MLLM layers it taps (``main``,
and ``late`` for Table 2's "14th -> 30th layer" row) and, for the presets that run on
the synthetic world, the backbones they are matched to (``synthetic``: ``toy`` or ``tiny``).
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
    )
