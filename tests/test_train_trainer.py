"""lens-train, what a run does: exact resume, the run folder, NaN handling, the preset a store chooses, a 27 x 27
grid, warm start. What it refuses, in one line: test_train_refusals.py (the stores of both:
tests/helpers/fake_stores.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lens_train.training.trainer as trainer_module
from lens_train.training.checkpoint import checkpoint_step, load_checkpoint
from lens_train.cli import train_app
from lens_train.training.trainer import TrainRequest, train
from tests.helpers.fake_stores import FAST, cli_error, train_request


def _losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["attn"], r["grad_norm"]) for r in rows]


def test_resume_continues_bit_for_bit(fake_stores, tmp_path, monkeypatch):
    steps = 5
    full = tmp_path / "full"
    train(train_request(fake_stores, full, steps=steps, ckpt_every=2))

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
        train(train_request(fake_stores, cut, steps=steps, ckpt_every=2))
    monkeypatch.setattr(trainer_module, "compute_losses", real)
    assert checkpoint_step(cut) == 2 and len(_losses(cut)) == 3

    # ... and resumed: the metrics of steps 3-5 are recomputed and equal, bit for bit.
    result = train(TrainRequest(caches=(fake_stores["train"], fake_stores["reason"]), out=cut, device="cpu", quiet=True,
                                resume=True))
    assert result.resumed_from == 2
    assert _losses(cut) == _losses(full)
    final_full, final_cut = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert final_full.keys() == final_cut.keys()
    assert all(torch.equal(final_full[k], final_cut[k]) for k in final_full)


def test_run_folder_contents(fake_stores, tmp_path):
    run = tmp_path / "run"
    train(train_request(fake_stores, run, steps=2, ckpt_every=1))
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "tiny" and config["model"]["hidden_size"] == 64
    assert config["train"]["steps"] == 2 and config["train"]["batch_size"] == 1
    assert config["sam"] == "tiny" and config["layer"] == 14
    assert [s["url"] for s in config["stores"]] == [fake_stores["train"], fake_stores["reason"]]
    assert all(s["identity_hash"] == config["identity_hash"] for s in config["stores"])
    assert config["warm_start"] == {"requested": False, "used": False}
    # The typed record reads it back, and writes exactly the JSON it was read from.
    from lens_train.training.run_config import RunConfig, read_run_config

    record = read_run_config(run)
    assert record.to_json() == (run / "config.json").read_text()
    assert record == RunConfig.from_dict(config) and record.stores[1].url == fake_stores["reason"]
    assert record.model.hidden_size == 64 and record.train.steps == 2 and record.layer == 14
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


def test_warm_start_unavailable_is_logged_not_fatal(fake_stores, tmp_path):
    lines: list[str] = []
    train(train_request(fake_stores, tmp_path / "warm", steps=1, warm_start=True), log=lines.append)
    assert any("warm start unavailable" in line for line in lines)
    config = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert config["warm_start"]["requested"] and not config["warm_start"]["used"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fake_stores, tmp_path, monkeypatch):
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
        "--cache", fake_stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "6", "--batch-size", "1",
        "--grad-accum", "2", "--workers", "0", "--ckpt-every", "2", "--device", "cpu", "--quiet", "--no-detach-peak"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "loss is nan at step 4" in lines[0] and "(step 2) is kept" in lines[0]
    assert checkpoint_step(run) == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    from lens_train.training.run_config import read_run_config
    from lens_train.training.loading import build_model

    model_config = read_run_config(run).model
    assert model_config.detach_peak is False  # the CLI's model override is recorded in the run
    model = build_model(model_config, "tiny", seed=0)
    load_checkpoint(run, model)  # the kept checkpoint loads (weights_only) ...
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())  # ... and is finite


def test_without_preset_the_store_chooses_it(fake_stores, toy_sam_store, tmp_path):
    """One default story: lens-cache build defaults to the toy backbones, lens-train to the preset made for
    the store's MLLM (tiny LLaVA store -> tiny; a backbone no preset is made for -> one line naming the fix)."""
    from lens_cache.backbones import default_layers
    from lens_train.training.presets import available_presets, load_preset, preset_for_mllm
    from lens_train.training.stores import default_preset

    assert default_preset([toy_sam_store.store.url]) == "tiny"
    assert [preset_for_mllm(b, d) for b, d in
            [("llava-1.5", 128), ("llava-1.5", 4096), ("qwen2-vl", 1536), ("llava-onevision", 3584)]] == [
        "toy", "official", "qwen2vl-2b", "onevision-7b"]
    for name in available_presets():  # a preset is made for an MLLM of its own width, and stage 1's
        preset = load_preset(name)     # default layers for a built-in MLLM are its preset's main layer
        if preset.made_for is not None:
            assert preset.made_for["hidden_size"] == preset.model.hidden_size, name
        if preset.synthetic is not None:
            assert default_layers(preset.synthetic["mllm"]) == (preset.main_layer,), name
    line = cli_error(["--cache", fake_stores["train"], "--out", str(tmp_path / "r")])  # the fake backbone
    assert line == ("error: no preset is made for this store's MLLM (fake-mllm, hidden size 64): pass --preset NAME "
                    f"(one of {available_presets()}) or a preset .json with model.hidden_size 64")


def test_a_27_by_27_store_trains_and_evaluates(tmp_path):
    """Nothing assumes 24 x 24: a store of 729 image tokens (LLaVA-OneVision's grid) with a grid_size-27
    preset trains, evaluates and draws its overlays, the heatmap 27 x 27."""
    from lens_manifests import build_manifest

    from lens_train.evaluation.evaluate import evaluate
    from lens_train.training.loading import load_run
    from lens_train.testing import build_store, small_synthetic
    from lens_train.training.presets import PRESET_DIR

    root = small_synthetic(tmp_path / "synthetic", images=2)
    store = build_store(build_manifest("synthetic-reason:val", root), tmp_path / "store27", spec="synthetic-reason:val",
                        grid_size=27)
    assert store.num_image_tokens == 729
    preset = json.loads((PRESET_DIR / "tiny.json").read_text())
    preset["model"]["grid_size"] = 27
    (tmp_path / "grid27.json").write_text(json.dumps(preset))
    train(TrainRequest(caches=(store.url,), out=tmp_path / "run", preset=str(tmp_path / "grid27.json"),
                       train_overrides={**FAST, "steps": 3}, device="cpu", quiet=True))
    assert load_run(tmp_path / "run").model.config.grid_size == 27
    metrics = evaluate(tmp_path / "run", store.url, out=tmp_path / "eval", log=lambda line: None)
    assert metrics["num_queries"] == store.num_queries and (tmp_path / "eval" / "overlays.png").is_file()


def test_warm_start_is_loaded_and_the_log_names_the_layers(toy_sam_store, tmp_path):
    lines: list[str] = []
    store = toy_sam_store.store
    train(TrainRequest(caches=(store.url,), out=tmp_path / "warm", preset="tiny", model_overrides={"prompt_dim": 64},
                       train_overrides={**FAST, "steps": 1, "grad_accum": 1, "warm_start": True}, sam=toy_sam_store.sam,
                       device="cpu", quiet=True), log=lines.append)
    assert any(line.startswith("warm start: head layers 0-1 loaded from the MLLM's decoder layers 14 and 15")
               and "rms_norm_eps (1e-05 vs 1e-06)" in line for line in lines)
    config = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert config["warm_start"] == {"requested": True, "used": True, "layers": [14, 15],
                                    "sha256": store.warm_start["sha256"]}


def test_format_2_store_warm_starts_its_first_layer(toy_sam_store, tmp_path):
    """Format 2 kept only the first layer's pair, keyed layers.0/1: still read, for that layer only."""
    import hashlib
    import shutil

    from lens_cache.identity import identity_hash
    from lens_cache.store import ATTRS_KEY, WARM_START_FILE, FeatureStore, open_group
    from lens_train.training.presets import load_preset
    from lens_train.training.stores import read_warm_start
    from safetensors.torch import load, save

    tiny = load_preset("tiny").model
    copy = tmp_path / "v2"
    shutil.copytree(toy_sam_store.store.location.local_path, copy)
    current = load((copy / WARM_START_FILE).read_bytes())
    legacy = {key.replace("decoder.14.", "layers.0.").replace("decoder.15.", "layers.1."): value
              for key, value in current.items() if key.split(".")[1] in ("14", "15")}
    data = save(legacy)
    (copy / WARM_START_FILE).write_bytes(data)
    group = open_group(FeatureStore.open(copy).location, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    record = {k: v for k, v in attrs["identity"]["warm_start"].items() if k != "by_layer"}
    identity = {**attrs["identity"], "warm_start": {**record, "sha256": hashlib.sha256(data).hexdigest()}}
    group.attrs.put({ATTRS_KEY: {**attrs, "format_version": 2, "identity": identity,
                                 "identity_hash": identity_hash(identity)}})
    v2 = FeatureStore.open(copy)
    warm = read_warm_start(v2, layer=14, config=tiny)
    assert warm.layers == (14, 15)
    assert all(torch.equal(warm.state_dicts[0][k], v) for k, v in toy_sam_store.extractor.mllm.decoder_layer_state_dict(14).items())
    assert read_warm_start(v2, layer=30, config=tiny) == (
        f"store {v2.url} holds the MLLM's decoder layers 14-15, for layer-14 features, not layer 30")


def test_warm_start_that_does_not_fit_or_was_changed_is_refused(toy_sam_store, tmp_path):
    import shutil

    from lens_cache.store import WARM_START_FILE, FeatureStore, verify_store
    from lens_core import LensConfig
    from lens_train.errors import UserError
    from lens_train.training.presets import load_preset
    from lens_train.training.stores import read_warm_start

    tiny = load_preset("tiny").model
    store = toy_sam_store.store
    wider = LensConfig.from_dict({**tiny.to_dict(), "mlp_size": 256})
    with pytest.raises(UserError) as err:
        read_warm_start(store, layer=14, config=wider)
    assert str(err.value) == (f"store {store.url} holds decoder layers of mlp_size 128 (preset: 256): "
                              "use a preset of the MLLM's sizes or --no-warm-start")
    assert read_warm_start(store, layer=30, config=tiny).layers == (30, 31)
    note = read_warm_start(store, layer=20, config=tiny)
    assert note == f"store {store.url} holds no decoder-layer weights for layer 20 (it caches no such layer)"

    copy = tmp_path / "store"
    shutil.copytree(store.location.local_path, copy)
    path = copy / WARM_START_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(data))
    tampered = FeatureStore.open(copy)
    with pytest.raises(UserError, match=r"decoder_layers.safetensors has sha256 \w{12}, the store recorded") as err:
        read_warm_start(tampered, layer=14, config=tiny)
    assert "\n" not in str(err.value)
    assert not verify_store(copy).ok
    with pytest.raises(UserError, match="the store recorded"):
        train(TrainRequest(caches=(str(copy),), out=tmp_path / "run", preset="tiny", model_overrides={"prompt_dim": 64},
                           train_overrides={**FAST, "steps": 1, "warm_start": True}, sam=toy_sam_store.sam,
                           device="cpu", quiet=True))
    path.unlink()
    with pytest.raises(UserError, match="lacks warm_start/decoder_layers.safetensors"):
        read_warm_start(tampered, layer=14, config=tiny)
