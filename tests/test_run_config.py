"""A run's config.json as a typed record: run folders written before it load, unknown formats are refused
in one line, and what the presets leave to LensConfig's defaults is what its docstring says."""

from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lens_core.config import PRESET_DEFAULTED, LensConfig
from lens_train.errors import UserError
from lens_train.training.run_config import RUN_FORMAT_VERSION, RunConfig, read_run_config

#: config.json of the demo run (`make demo`, preset toy) as lens-train wrote it before RunConfig existed,
#: copied byte for byte from its run folder
FORMAT_1 = Path(__file__).parent / "data" / "run-config-format1.json"


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FORMAT_1, run / "config.json")
    return run


def _edit(run: Path, **changes) -> None:
    values = json.loads((run / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    (run / "config.json").write_text(json.dumps(values))


def test_a_run_folder_written_before_the_record_existed_loads(run_dir):
    config = read_run_config(run_dir)
    assert config.format_version == 1 and config.preset == "toy" and config.layer == 3 and config.sam == "toy"
    assert config.model == LensConfig.from_dict(json.loads(FORMAT_1.read_text())["model"])
    assert config.model.hidden_size == 128 and config.model.layer_type == "llama"  # a field added since: its default
    assert config.train.betas == (0.9, 0.95) and config.train.steps == 600
    assert config.stores[0].url == "/work/exp144/stores/synthetic-train-L3" and config.stores[0].layers == (3,)
    assert config.stores[0].identity["name_or_path"] == "toy"
    assert config.warm_start["used"] and config.cli == {"reproduce": "lens"}

    # Written back: the same keys in the same order and the same values; the model gains only the fields
    # LensConfig has grown since, at the defaults the run was trained with.
    raw = json.loads(FORMAT_1.read_text())
    written = json.loads(config.to_json())
    assert list(written) == list(raw)
    raw_model, written_model = raw.pop("model"), written.pop("model")
    assert written == raw
    assert {key: written_model[key] for key in raw_model} == raw_model
    assert set(written_model) - set(raw_model) == {
        "layer_type", "num_key_value_heads", "head_input", "final_norm", "final_norm_eps", "descriptor",
        "descriptor_ffn_size", "descriptor_encoder_ffn_size", "descriptor_dropout", "global_only_after_descriptor",
        "coords", "keypoint_strict", "detach_subpixel", "cls_position_std", "train_iou_head", "rope", "mrope_section"}
    # ... at the values that mean what the run was trained with (the structure before the fidelity switches)
    assert config.model.head_input == "image_text" and config.model.descriptor == "paper" and not config.model.final_norm


def test_a_newer_format_is_one_line_naming_the_file_and_the_fix(run_dir):
    _edit(run_dir, format_version=RUN_FORMAT_VERSION + 1)
    with pytest.raises(UserError) as error:
        read_run_config(run_dir)
    message = str(error.value)
    assert "\n" not in message and str(run_dir / "config.json") in message
    assert f"run format {RUN_FORMAT_VERSION + 1}, newer than this lens-seg reads" in message
    assert "upgrade" in message and "0.1.0" in message  # the version that wrote it

    # ... and a command that reads it says so in one line, exit 2.
    from lens_train.cli import eval_app

    result = CliRunner().invoke(eval_app, ["--checkpoint", str(run_dir), "--cache", str(run_dir / "no-store")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "newer than this lens-seg reads" in lines[0]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"format_version": 0}, "format_version 0, which no lens-train writes"),
    ({"format_version": "1"}, "format_version '1', which no lens-train writes"),
    ({"format_version": None}, "format_version None, which no lens-train writes"),
    ({"format": "something-else"}, "is not a lens-train run config"),
    ({"layer": None, "sam": None}, "lacks layer, sam"),
    ({"notes": "hand-written"}, "has unknown notes"),
    ({"model": {"hidden_size": 128}}, "missing"),  # LensConfig's own check, named with the file
    ({"stores": [{"url": "x"}]}, "a record of its stores lacks"),
])
def test_a_damaged_record_is_one_line_naming_the_file(run_dir, changes, expected):
    _edit(run_dir, **changes)
    with pytest.raises(UserError) as error:
        read_run_config(run_dir)
    assert expected in str(error.value) and str(run_dir / "config.json") in str(error.value)
    assert "\n" not in str(error.value)


def test_not_json_and_no_config_are_one_line(tmp_path, run_dir):
    with pytest.raises(UserError, match=r"is not a lens-train run \(config.json missing\)"):
        read_run_config(tmp_path / "empty")
    (run_dir / "config.json").write_text('{"format": "lens-train-run", ')
    with pytest.raises(UserError, match="is not valid JSON"):
        read_run_config(run_dir)


def test_round_trip_of_a_record():
    config = RunConfig.from_dict(json.loads(FORMAT_1.read_text()))
    assert RunConfig.from_dict(config.to_dict()) == config


def test_presets_leave_to_the_defaults_only_what_lens_config_says():
    from lens_train.training.presets import PRESET_DIR, available_presets

    names = {f.name for f in fields(LensConfig)}
    assert PRESET_DEFAULTED <= names
    required = {f.name for f in fields(LensConfig) if f.default is MISSING and f.default_factory is MISSING}
    assert required == {"hidden_size", "num_heads", "mlp_size"}
    for name in available_presets():
        stated = set(json.loads((PRESET_DIR / f"{name}.json").read_text())["model"])
        assert names - stated <= PRESET_DEFAULTED, (name, sorted(names - stated - PRESET_DEFAULTED))
