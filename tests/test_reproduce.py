"""make reproduce-table2/3 at tiny scale: the whole pipeline, the table layout, skipping finished stages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lens_train.reproduction import cli, reproduce, table1
from lens_train.errors import UserError


def _settings(tmp_path, **kwargs) -> reproduce.Settings:
    return reproduce.Settings(preset="tiny", work=tmp_path / "work", results=tmp_path / "results", device="cpu",
                              steps=1, tiny_images=2, quiet=True, **kwargs)


def test_real_preset_names_every_missing_input(tmp_path):
    settings = reproduce.Settings(preset="paper", work=tmp_path, results=tmp_path, data_root=tmp_path / "nope")
    with pytest.raises(UserError) as error:
        reproduce.check_inputs(settings)
    message = str(error.value)
    assert "DATA_ROOT" in message and "not a folder" in message and "MLLM=" in message and "SAM=" in message
    assert cli.main(["table2", "--preset", "paper", "--work", str(tmp_path), "--quiet"]) == 2


@pytest.mark.parametrize(("argv", "expected"), [
    # `make demo`: the toy preset, its own work folder, 48 images, the preset's steps
    (["demo"], {"preset": "toy", "work": Path("work/demo-toy"), "results": Path("results"), "tiny_images": 48,
                "steps": None, "seeds": (0,), "mllm": None, "sam": None, "data_root": None, "device": None}),
    # `make reproduce-table2` as the Makefile spells it (empty DATA_ROOT, MLLM, SAM are unset)
    (["table2", "--preset", "paper", "--data-root", "", "--mllm", "", "--sam", "", "--seeds", "0"],
     {"preset": "paper", "work": Path("work/paper"), "tiny_images": 16, "steps": None, "seeds": (0,),
      "mllm": None, "sam": None, "data_root": None}),
    (["table2"], {"preset": "toy", "work": Path("work/toy")}),  # every command's default: the toy world
    (["table3"], {"preset": "toy", "work": Path("work/toy")}),
    (["table2", "--preset", "tiny", "--seeds", "0,1,2", "--device", "cpu"],
     {"preset": "tiny", "work": Path("work/tiny"), "steps": reproduce.TINY_TABLE_STEPS, "seeds": (0, 1, 2),
      "device": "cpu"}),
    (["table3", "--preset", "toy", "--mllm", "", "--work", "w", "--results", "r", "--steps", "3", "--tiny-images", "5",
      "--quiet"],
     {"preset": "toy", "work": Path("w"), "results": Path("r"), "steps": 3, "tiny_images": 5, "quiet": True}),
    (["demo", "--preset", "tiny"], {"preset": "tiny", "work": Path("work/demo-tiny"), "steps": None, "tiny_images": 48}),
    # `make reproduce-table1 PRESET=toy`
    (["table1", "--preset", "toy", "--data-root", "", "--mllm", "", "--sam", ""],
     {"preset": "toy", "work": Path("work/table1-toy"), "tiny_images": 48, "steps": None}),
])
def test_command_line_defaults(monkeypatch, argv, expected):
    """The options and defaults of each command."""
    seen = {}
    module, what = {"table1": (table1, "reproduce_table1"), "table2": (reproduce, "reproduce_table2"),
                    "table3": (reproduce, "reproduce_table3"), "demo": (reproduce, "demo")}[argv[0]]
    monkeypatch.setattr(module, what, lambda settings: seen.setdefault("settings", settings))
    assert cli.main(argv) == 0
    settings = seen["settings"]
    assert {key: getattr(settings, key) for key in expected} == expected


@pytest.mark.slow  # 30 s alone, ~50 s on a busy machine: caches, trains and evaluates every Table 2 row
def test_table2_tiny_end_to_end_and_skips_what_is_done(tmp_path, monkeypatch):
    settings = _settings(tmp_path)
    path = reproduce.reproduce_table2(settings)
    text = path.read_text()
    assert path.name == "table2-tiny.md" and "Tiny scale" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(reproduce.TABLE2_ROWS)  # header + LENS + four ablations
    for label, name in zip(reproduce.TABLE2_ROWS.values(), reproduce.TABLE2_ROWS):
        row = next(r for r in rows if r.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 8
        paper = [v for column in ("val", "short", "long", "test") for v in reproduce.PAPER_TABLE2[name][column]]
        for cell, expected in zip(cells, paper):
            match = re.fullmatch(r"(—|\d+\.\d) \((\d+\.\d)\)", cell)
            assert match and float(match.group(2)) == expected, cell
    # Ours come from the runs' metrics.json files: the LENS row's first cell is its val gIoU.
    run = settings.work / "runs" / "table2-tiny-lens"
    val = json.loads((run / "eval-synthetic-reason-val" / "metrics.json").read_text())
    lens_row = next(r for r in rows if r.startswith("| LENS-7B |"))
    assert lens_row.split("|")[2].strip().startswith(f"{100 * val['giou']:.1f} ")
    # Every ablation is its own run with its own switch.
    layer30 = json.loads((settings.work / "runs" / "table2-tiny-layer30" / "config.json").read_text())
    no_kp = json.loads((settings.work / "runs" / "table2-tiny-no_keypoint_description" / "config.json").read_text())
    no_attn = json.loads((settings.work / "runs" / "table2-tiny-no_attn_loss" / "config.json").read_text())
    assert layer30["layer"] == 30 and not no_kp["model"]["use_keypoint_description"]
    assert no_attn["train"]["attn_weight"] == 0.0

    # A second invocation finds every stage complete: nothing is built, trained or evaluated again.
    def fail(*args, **kwargs):
        raise AssertionError("a complete stage was run again")

    import lens_cache.build
    import lens_train.evaluation.evaluate
    import lens_train.training.trainer

    monkeypatch.setattr(lens_cache.build, "build_cache", fail)
    monkeypatch.setattr(lens_train.training.trainer, "train", fail)
    monkeypatch.setattr(lens_train.evaluation.evaluate, "evaluate", fail)
    assert reproduce.reproduce_table2(settings).read_text().splitlines()[4:] == text.splitlines()[4:]

    # Table 3 reuses the LENS run and adds the referring stores.
    monkeypatch.undo()
    table3 = reproduce.reproduce_table3(settings).read_text()
    row = next(line for line in table3.splitlines() if line.startswith("| LENS (ours) |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert len(cells) == len(reproduce.PAPER_TABLE3) + 1
    assert all(re.fullmatch(r"\d+\.\d", c) for c in cells[:3]) and cells[3:8] == ["—"] * 5


def test_table2_over_seeds_reports_mean_sd_and_which_ablations_exceed_noise(tmp_path):
    import numpy as np

    def metrics(giou):
        part = {"giou": giou, "ciou": giou}
        base = {"whole_image": part, "heatmap": part}
        return {"val": part, "test": {**part, "short": part, "long": part, "baselines": base}}

    lens = [0.60, 0.62, 0.64]
    results = {name: [metrics(v) for v in lens] for name in reproduce.TABLE2_ROWS}
    results["layer30"] = [metrics(v) for v in (0.30, 0.31, 0.29)]  # far below: beyond noise
    results["no_attn_loss"] = [metrics(v) for v in (0.63, 0.59, 0.61)]  # about LENS: within noise
    settings = reproduce.Settings(preset="toy", work=tmp_path, results=tmp_path, seeds=(0, 1, 2))
    path = tmp_path / "t.md"
    reproduce.write_table2(path, results, settings, seconds=1.0)
    text = path.read_text()
    sd = np.std(lens, ddof=1) * 100
    assert f"| LENS-7B | {100 * np.mean(lens):.1f} ± {sd:.1f} (61.4)" in text
    diff, se = reproduce._difference([0.30, 0.31, 0.29], lens)
    assert diff == pytest.approx(0.30 - 0.62)
    assert se == pytest.approx(np.sqrt(np.var([0.30, 0.31, 0.29], ddof=1) / 3 + np.var(lens, ddof=1) / 3))
    lines = {line.split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert reproduce.row_label("layer30", settings) == "layer 3 → layer 4"  # the toy preset's main and late layers
    assert lines["- layer 3 → layer 4"].endswith("beyond noise")
    assert lines["- w/o L_attn"].endswith("within noise")


def test_table2_runs_picks_rows_and_a_preset_file_names_them(tmp_path, monkeypatch):
    """--runs trains only the rows named (LENS always, the others are compared with it); a misspelt row is one
    line before any cache is built; a preset .json names its runs and table by its file stem."""
    settings = _settings(tmp_path, runs=("no_attn_loss",))
    assert [run.name for run in reproduce.table2_runs(settings)] == ["lens", "no_attn_loss"]
    assert reproduce.table2_runs(_settings(tmp_path)) == reproduce.TABLE2_RUNS
    built = []
    monkeypatch.setattr(reproduce, "training_stores", lambda s: built.append(1))
    with pytest.raises(UserError, match=r"--runs: no Table 2 row no_such_row: choose among .*no_attn_loss"):
        reproduce.reproduce_table2(_settings(tmp_path, runs=("no_such_row",)))
    assert built == []
    preset = tmp_path / "my-toy.json"
    preset.write_text((Path(reproduce.__file__).parents[1] / "training" / "presets" / "toy.json").read_text())
    assert reproduce.Settings(preset=str(preset), work=tmp_path, results=tmp_path).name == "my-toy"
    seen = {}
    monkeypatch.setattr(reproduce, "reproduce_table2", lambda s: seen.setdefault("settings", s))
    assert cli.main(["table2", "--runs", "lens,layer30", "--preset", str(preset)]) == 0
    assert seen["settings"].runs == ("lens", "layer30") and seen["settings"].name == "my-toy"


def test_a_run_folder_killed_before_its_first_checkpoint_is_trained_again(tmp_path, monkeypatch):
    """A reproduction killed before a run's first checkpoint left the folder (config, metrics header): the rerun
    continues it (resume, which starts fresh without a checkpoint) instead of stopping at 'already holds a run'."""
    import lens_train.training.trainer as trainer

    settings = _settings(tmp_path)
    out = settings.work / "runs" / "table2-tiny-lens"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("")
    seen = {}
    monkeypatch.setattr(trainer, "train", lambda request, **kw: seen.setdefault("resume", request.resume))
    reproduce.train_run(settings, reproduce.TABLE2_RUNS[0], ["store"], prefix="table2-tiny")
    assert seen["resume"] is True
