"""lens-train: exact resume, refusals with one-line errors, NaN handling, the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lens_train.trainer as trainer_module
from lens_train.checkpoint import checkpoint_step, load_checkpoint
from lens_train.cli import train_app
from lens_train.errors import NonFiniteLossError
from lens_train.trainer import TrainRequest, train

FAST = {"batch_size": 1, "grad_accum": 2, "num_workers": 0, "log_every": 1, "warmup_steps": 2}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from lens_cache.store import ATTRS_KEY, open_group
    from lens_manifests import build_manifest

    from lens_train.testing import build_store, small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=2)
    out = tmp_path_factory.mktemp("stores")
    manifest = build_manifest("synthetic:train", root)
    train_store = build_store(manifest, out / "train", spec="synthetic:train")
    reason = build_store(build_manifest("synthetic-reason:val", root), out / "reason", spec="synthetic-reason:val")
    other = build_store(build_manifest("synthetic-reason:val", root), out / "other", spec="synthetic-reason:val",
                        mllm="another-mllm")
    incomplete = build_store(build_manifest("synthetic-reason:val", root), out / "incomplete", spec="synthetic-reason:val")
    group = open_group(incomplete.location, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["complete"] = False
    group.attrs.put({ATTRS_KEY: attrs})
    return {"train": train_store.url, "reason": reason.url, "other": other.url, "incomplete": incomplete.url}


def _request(stores, out: Path, **train_overrides) -> TrainRequest:
    return TrainRequest(caches=(stores["train"], stores["reason"]), out=out, preset="tiny",
                        train_overrides={**FAST, **train_overrides}, device="cpu", quiet=True)


def _losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["attn"], r["grad_norm"]) for r in rows]


def test_resume_continues_bit_for_bit(stores, tmp_path, monkeypatch):
    steps = 5
    full = tmp_path / "full"
    train(_request(stores, full, steps=steps, ckpt_every=2))

    # The same run, killed during step 4 (after the step-2 checkpoint and step 3's metrics row) ...
    cut = tmp_path / "cut"
    real = trainer_module.compute_losses
    calls = {"n": 0}

    def crash_in_step_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3 * FAST["grad_accum"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_losses", crash_in_step_four)
    with pytest.raises(KeyboardInterrupt):
        train(_request(stores, cut, steps=steps, ckpt_every=2))
    monkeypatch.setattr(trainer_module, "compute_losses", real)
    assert checkpoint_step(cut) == 2 and len(_losses(cut)) == 3

    # ... and resumed: the metrics of steps 3-5 are recomputed and equal, bit for bit.
    result = train(TrainRequest(caches=(stores["train"], stores["reason"]), out=cut, device="cpu", quiet=True,
                                resume=True))
    assert result.resumed_from == 2
    assert _losses(cut) == _losses(full)
    final_full, final_cut = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert final_full.keys() == final_cut.keys()
    assert all(torch.equal(final_full[k], final_cut[k]) for k in final_full)


def test_run_folder_contents(stores, tmp_path):
    run = tmp_path / "run"
    train(_request(stores, run, steps=2, ckpt_every=1))
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "tiny" and config["model"]["hidden_size"] == 64
    assert config["train"]["steps"] == 2 and config["train"]["batch_size"] == 1
    assert config["sam"] == "tiny" and config["layer"] == 14
    assert [s["url"] for s in config["stores"]] == [stores["train"], stores["reason"]]
    assert all(s["identity_hash"] == config["identity_hash"] for s in config["stores"])
    assert config["warm_start"] == {"requested": False, "used": False}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "seg", "dice", "bce", "attn", "lr", "grad_norm", "samples_per_s"} <= set(rows[0])
    assert (run / "curve.png").stat().st_size > 0
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 2
    assert not list(run.glob("*.tmp"))
    # Trainable weights only: SAM's frozen prompt encoder is rebuilt, never saved.
    weights = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("head.") for k in weights) and any(".mask_decoder." in k for k in weights)
    assert not any(".prompt_encoder." in k for k in weights)
    # optimizer.pt holds tensors and plain types only.
    state = torch.load(run / "optimizer.pt", weights_only=True)
    assert state["step"] == 2 and isinstance(state["rng"]["model_generator"], torch.Tensor)


def test_warm_start_unavailable_is_logged_not_fatal(stores, tmp_path):
    lines: list[str] = []
    train(_request(stores, tmp_path / "warm", steps=1, warm_start=True), log=lines.append)
    assert any("warm start unavailable" in line for line in lines)
    config = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert config["warm_start"]["requested"] and not config["warm_start"]["used"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(stores, tmp_path, monkeypatch):
    real = trainer_module.compute_losses
    calls = {"n": 0}

    def nan_in_step_four(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] > 3 * FAST["grad_accum"]:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(trainer_module, "compute_losses", nan_in_step_four)
    run = tmp_path / "nan"
    result = CliRunner().invoke(train_app, [
        "--cache", stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "6", "--batch-size", "1",
        "--grad-accum", "2", "--workers", "0", "--ckpt-every", "2", "--device", "cpu", "--quiet", "--no-detach-peak"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "loss is nan at step 4" in lines[0] and "(step 2) is kept" in lines[0]
    assert checkpoint_step(run) == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    from lens_train.trainer import build_model, configs_from_run, read_run_config

    model_config, _ = configs_from_run(read_run_config(run))
    assert model_config.detach_peak is False  # the CLI's model override is recorded in the run
    model = build_model(model_config, "tiny", seed=0)
    load_checkpoint(run, model)  # the kept checkpoint loads (weights_only) ...
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())  # ... and is finite


def _cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(train_app, [*args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_refuses_stores_of_different_backbones(stores, tmp_path):
    line = _cli_error(["--cache", stores["train"], "--cache", stores["other"], "--preset", "tiny",
                       "--out", str(tmp_path / "r")])
    assert "different backbones" in line and "'fake-mllm' vs 'another-mllm'" in line


def test_refuses_a_layer_the_store_lacks(stores, tmp_path):
    line = _cli_error(["--cache", stores["train"], "--preset", "tiny", "--layer", "13", "--out", str(tmp_path / "r")])
    assert "caches layer(s) 14, not 13: pass --layer 14" in line


def test_refuses_a_preset_of_another_width(stores, tmp_path):
    line = _cli_error(["--cache", stores["train"], "--preset", "official", "--out", str(tmp_path / "r")])
    assert "was built with d=64 (fake-mllm backbone) but preset 'official' expects 4096: use --preset tiny" in line


def test_refuses_an_incomplete_store(stores, tmp_path):
    line = _cli_error(["--cache", stores["incomplete"], "--preset", "tiny", "--out", str(tmp_path / "r")])
    assert "incomplete" in line and "lens-cache build" in line


def test_refuses_to_overwrite_or_change_a_run(stores, tmp_path):
    run = tmp_path / "run"
    train(_request(stores, run, steps=1))
    line = _cli_error(["--cache", stores["train"], "--cache", stores["reason"], "--preset", "tiny", "--out", str(run)])
    assert "already holds a run" in line and "--resume" in line
    line = _cli_error(["--cache", stores["train"], "--cache", stores["reason"], "--out", str(run), "--resume",
                       "--lr", "0.5"])
    assert "these training settings differ: lr 0.0003 -> 0.5" in line
    line = _cli_error(["--cache", stores["reason"], "--out", str(run), "--resume"])
    assert "needs the stores" in line
    line = _cli_error(["--cache", stores["train"], "--mix", "1:1", "--preset", "tiny", "--out", str(tmp_path / "m")])
    assert "--mix takes three" in line
