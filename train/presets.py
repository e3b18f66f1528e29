"""The registry of presets: ``paper``, ``official`` and ``tiny`` live as JSON files beside
this module (data, not code); a path to another JSON file of the same shape works too."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


def load_preset(name_or_path: str, *, model_overrides: dict | None = None, train_overrides: dict | None = None) -> Preset:
    """Load a preset by name (``paper``, ``official``, ``tiny``) or from a JSON path, with overrides."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name_or_path!r}: choose one of {available_presets()} or give a .json path")
    raw = json.loads(path.read_text())
    model = {**raw["model"], **(model_overrides or {})}
    train = {**raw["train"], **(train_overrides or {})}
    return Preset(
        name=path.stem,
        description=raw.get("description", ""),
        model=LensConfig.from_dict(model),
        train=TrainConfig.from_dict(train),
    )
