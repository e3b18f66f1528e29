"""One table of per-backbone defaults (lens_cache.backbones.defaults): each row against the training preset it
names, and ``lens-cache build`` without ``--layers`` caching the layer that preset trains on."""

from __future__ import annotations

import json
from pathlib import Path

import lens_cache.backbones
import pytest
from lens_cache.backbones import default_layers
from lens_cache.backbones.defaults import BUILTIN_DEFAULTS, MODEL_TYPE_DEFAULTS, defaults_for
from lens_cache.cli import app
from lens_cache.store import FeatureStore
from lens_cache.testing import fake_build_extractor, make_test_manifest
from lens_cache.warm_start import warm_start_layers
from typer.testing import CliRunner

PRESETS = Path(__file__).resolve().parents[1] / "train" / "lens_train" / "training" / "presets"
ROWS = {**{f"model_type:{k}": v for k, v in MODEL_TYPE_DEFAULTS.items()}, **BUILTIN_DEFAULTS}


def _preset(name: str) -> dict:
    return json.loads((PRESETS / f"{name}.json").read_text())


@pytest.mark.parametrize("key", sorted(ROWS))
def test_every_row_agrees_with_its_preset(key):
    row = ROWS[key]
    assert row.warm_start == warm_start_layers(row.main_layer)  # the warm start's one rule (k, k + 1)
    assert row.layers == (row.main_layer,)
    if row.preset is None:
        return
    preset = _preset(row.preset)
    assert preset["layers"]["main"] == row.main_layer, key
    assert preset["layers"].get("late") == row.late_layer, key
    assert preset["made_for"] == {"backbone": row.backbone, "hidden_size": row.hidden_size}, key
    assert preset["model"].get("grid_size", 24) == row.grid_size, key


def test_the_documented_rows():
    """The values the project documents (README's backbone table)."""
    summary = {key: (r.main_layer, r.late_layer, r.warm_start, r.grid_size, r.preset) for key, r in ROWS.items()}
    assert summary["model_type:llava"] == (14, 30, (14, 15), 24, "official")
    assert summary["model_type:qwen2_vl"] == (20, 27, (20, 21), 24, "qwen2vl-2b")
    assert summary["model_type:qwen2_5_vl"] == (26, 35, (26, 27), 24, "qwen25vl-3b")
    assert summary["model_type:llava_onevision"] == (14, 27, (14, 15), 27, "onevision-7b")
    assert summary["toy"] == (3, 4, (3, 4), 24, "toy")
    assert summary["tiny"] == (14, 30, (14, 15), 24, "tiny")


@pytest.mark.parametrize("name", sorted(BUILTIN_DEFAULTS))
def test_builtin_rows_describe_the_built_model(name):
    import torch

    from lens_cache.backbones import build_mllm

    row = BUILTIN_DEFAULTS[name]
    mllm = build_mllm(name, device="cpu", dtype=torch.float32)
    assert mllm.layers == row.layers == default_layers(name)
    built = (mllm.identity["backbone"], mllm.grid_size, mllm.hidden_size)
    assert built == (row.backbone, row.grid_size, row.hidden_size)


@pytest.mark.parametrize(("config", "layer"), [("Qwen2VLConfig", 20), ("Qwen2_5_VLConfig", 26),
                                               ("LlavaOnevisionConfig", 14), ("LlavaConfig", 14)])
def test_build_without_layers_caches_the_layer_the_preset_trains_on(config, layer, tmp_path, monkeypatch):
    """``lens-cache build --mllm <a Qwen2-VL folder>`` used to cache layer 14 while qwen2vl-2b trains on 20."""
    import transformers
    from lens_manifests import write_manifest

    folder = tmp_path / "checkpoint"
    getattr(transformers, config)().save_pretrained(folder)  # default_layers reads the config only
    assert default_layers(str(folder)) == (layer,)
    assert defaults_for(str(tmp_path / "nothing-there")) is None and default_layers(str(tmp_path / "x")) == (14,)

    monkeypatch.setattr(lens_cache.backbones, "build_extractor", fake_build_extractor, raising=False)
    manifest = tmp_path / "manifest.parquet"
    write_manifest(make_test_manifest(tmp_path / "images", num_images=2, seed=1), manifest, spec="testset:val")
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["build", "--manifest", str(manifest), "--out", str(out), "--mllm", str(folder),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(str(out)).layers == (layer,)
