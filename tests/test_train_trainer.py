"""lens-train: exact resume, refusals with one-line errors, NaN handling, the run folder."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lens_train.training.trainer as trainer_module
from lens_train.training.checkpoint import checkpoint_step, load_checkpoint
from lens_train.cli import train_app
from lens_train.training.trainer import TrainRequest, train

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
    # The typed record reads it back, and writes exactly the JSON it was read from.
    from lens_train.training.run_config import RunConfig, read_run_config

    record = read_run_config(run)
    assert record.to_json() == (run / "config.json").read_text()
    assert record == RunConfig.from_dict(config) and record.stores[1].url == stores["reason"]
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
    from lens_train.training.run_config import read_run_config
    from lens_train.training.trainer import build_model

    model_config = read_run_config(run).model
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


@pytest.mark.parametrize(("device", "expected"), [
    ("tpu", "error: --device takes cpu, cuda or cuda:N, got 'tpu'"),
    ("meta", "error: --device takes cpu, cuda or cuda:N, got 'meta'"),  # a torch device, not one to run on
    pytest.param("cuda", "error: --device cuda but no CUDA device is visible: use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")),
])
def test_device_is_resolved_as_in_stage_one(stores, tmp_path, device, expected):
    """lens_cache.backbones.runtime.resolve_device, the one every command uses (lens-cache build: test_cache_cli)."""
    result = CliRunner().invoke(train_app, ["--cache", stores["train"], "--preset", "tiny", "--out", str(tmp_path / "r"),
                                            "--device", device, "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == expected


def test_refuses_stores_of_different_backbones(stores, tmp_path):
    line = _cli_error(["--cache", stores["train"], "--cache", stores["other"], "--preset", "tiny",
                       "--out", str(tmp_path / "r")])
    assert "different backbones" in line and "'fake-mllm' vs 'another-mllm'" in line


def test_refuses_a_layer_the_store_lacks(stores, tmp_path):
    line = _cli_error(["--cache", stores["train"], "--preset", "tiny", "--layer", "13", "--out", str(tmp_path / "r")])
    assert "caches layer(s) [14], not 13: pass --layer 14" in line


def test_refuses_a_preset_of_another_width(stores, tmp_path):
    line = _cli_error(["--cache", stores["train"], "--preset", "official", "--out", str(tmp_path / "r")])
    assert "was built with d=64 (fake-mllm backbone) but preset 'official' expects 4096: use --preset tiny" in line


def test_without_preset_the_store_chooses_it(stores, toy_sam_store, tmp_path):
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
    line = _cli_error(["--cache", stores["train"], "--out", str(tmp_path / "r")])  # the fake backbone
    assert line == ("error: no preset is made for this store's MLLM (fake-mllm, hidden size 64): pass --preset NAME "
                    f"(one of {available_presets()}) or a preset .json with model.hidden_size 64")


def test_refuses_a_preset_of_another_image_grid(stores, tmp_path):
    """The grid the head reads comes from the preset and must be the store's: 27 x 27 (LLaVA-OneVision) on a
    576-token store is one line, not a shape error at the first batch."""
    import json

    from lens_train.training.presets import PRESET_DIR

    preset = json.loads((PRESET_DIR / "tiny.json").read_text())
    preset["model"]["grid_size"] = 27
    path = tmp_path / "grid27.json"
    path.write_text(json.dumps(preset))
    line = _cli_error(["--cache", stores["train"], "--preset", str(path), "--out", str(tmp_path / "r")])
    assert "holds 576 image tokens per image but preset 'grid27' reads a 27 x 27 grid (729): " \
           "give a preset with model.grid_size 24" in line


def test_a_27_by_27_store_trains_and_evaluates(tmp_path):
    """Nothing assumes 24 x 24: a store of 729 image tokens (LLaVA-OneVision's grid) with a grid_size-27
    preset trains, evaluates and draws its overlays, the heatmap 27 x 27."""
    from lens_manifests import build_manifest

    from lens_train.evaluation.evaluate import evaluate, load_run
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
                       train_overrides=FAST, device="cpu", quiet=True))
    assert load_run(tmp_path / "run").model.config.grid_size == 27
    metrics = evaluate(tmp_path / "run", store.url, out=tmp_path / "eval", log=lambda line: None)
    assert metrics["num_queries"] == store.num_queries and (tmp_path / "eval" / "overlays.png").is_file()


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


def _damaged_copy(url: str, tmp_path: Path, kind: str) -> Path:
    """A copy of a store with every SAM chunk damaged (``kind``), or its manifest.parquet rewritten."""
    import shutil

    from lens_cache.testing import damage_chunk

    copy = tmp_path / "damaged"
    shutil.copytree(url, copy)
    if kind == "manifest":
        data = (copy / "manifest.parquet").read_bytes()
        (copy / "manifest.parquet").write_bytes(data[:-20] + b"x" * 20)
    else:
        for chunk in (copy / "images" / "sam" / "c").glob("*/0/0/0"):
            damage_chunk(chunk, kind)
    return copy


#: What the one-line refusal says about each damage (the sample, then how to repair).
DAMAGE_FOUND = {
    "deleted": "is damaged (images/sam: its chunk is missing)",
    "truncated": "is damaged (images/sam: its chunk does not decode (RuntimeError: Zstd decompression error",
    "flipped": "is damaged (images/sam: ",  # checksum mismatch, or a zstd frame that no longer decodes
    "manifest": "manifest.parquet is unreadable",
}


@pytest.mark.parametrize("kind", ["deleted", "truncated", "flipped", "manifest"])
def test_a_damaged_store_is_refused_in_one_line(stores, tmp_path, kind):
    """Issue 11: with every SAM chunk deleted lens-train trained on zeros; now it names the sample and the fix."""
    copy = _damaged_copy(stores["train"], tmp_path, kind)
    line = _cli_error(["--cache", str(copy), "--preset", "tiny", "--out", str(tmp_path / "run"), "--steps", "1",
                       "--batch-size", "1", "--grad-accum", "1", "--workers", "0"])
    assert line.startswith(f"error: store {copy}: ") and DAMAGE_FOUND[kind] in line
    if kind != "manifest":
        assert "image " in line.split(DAMAGE_FOUND[kind])[0]  # names the sample
    assert line.endswith(f"repair it by rerunning the `lens-cache build ... --out {copy}` command that made it "
                         "(it recomputes only the damaged blocks)")


def test_two_runs_on_one_out_folder(stores, tmp_path):
    """Issue 11: two runs on one --out both ran and mixed their metrics; now the second is refused."""
    import signal
    import socket

    from lens_cache.testing import hold_lock

    run = tmp_path / "run"
    holder = hold_lock(run, "lens-train")
    try:
        line = _cli_error(["--cache", stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "1"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert line.startswith(f"error: {run} is in use by lens-train (pid {holder.pid} on {socket.gethostname()}, since ")
    assert not run.exists()

    # The holder died holding the lock: the next run takes it over (and says so), then removes it.
    lines: list[str] = []
    train(_request(stores, run, steps=1), log=lines.append)
    assert any(line.startswith(f"took over the lock of lens-train (pid {holder.pid} on") for line in lines)
    assert checkpoint_step(run) == 1 and not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError(2, "No such file", "/x")])
def test_a_bug_keeps_its_traceback(stores, tmp_path, monkeypatch, bug):
    """Only user errors are one line; any other exception (a bug) reaches the user with its traceback."""
    def broken(request):
        raise bug

    monkeypatch.setattr(trainer_module, "train", broken)
    result = CliRunner().invoke(train_app, ["--cache", stores["train"], "--preset", "tiny", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.exception is bug
    assert "error: " not in result.stderr


class _FullDiskFile:
    """A file on a disk that fills up after ``room`` bytes (its ``write`` then raises ENOSPC)."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_torch_save_reports_a_full_disk_as_the_oserror(tmp_path, monkeypatch):
    """torch.save says only 'unexpected pos' when the disk fills up; the optimizer file is saved so that
    the OSError itself (errno 28) reaches the CLI."""
    import builtins

    import lens_manifests.files

    monkeypatch.setattr(lens_manifests.files, "open", lambda *a, **k: _FullDiskFile(builtins.open(*a, **k), 100),
                        raising=False)
    with pytest.raises(OSError) as error:
        lens_manifests.files.torch_save({"x": torch.zeros(1000)}, tmp_path / "x.pt")
    assert error.value.errno == errno.ENOSPC


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_no_tmp(stores, tmp_path, monkeypatch, code):
    """Issue 11: a full disk during training gave a traceback ('unexpected pos', safetensors' I/O error)
    and left .tmp files; a read-only output for train or eval a traceback. Now: one line naming --out,
    exit 2, no .tmp left; the run continues with --resume once there is room."""
    import pyarrow.parquet
    from safetensors import SafetensorError

    import lens_train.training.checkpoint
    from lens_train.cli import eval_app

    fix = {errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
           errno.EROFS: "read-only file system: write elsewhere"}[code]

    def full_disk_save_file(tensors, where, metadata=None):  # what safetensors raises on a full/read-only disk
        Path(where).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    run = tmp_path / "run"
    train_args = ["--cache", stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "1",
                  "--batch-size", "1", "--grad-accum", "1", "--workers", "0"]
    with monkeypatch.context() as patch:
        patch.setattr(lens_train.training.checkpoint, "save_file", full_disk_save_file)
        assert _cli_error(train_args) == f"error: cannot write {run}: {fix}"
    assert not {p.name for p in run.iterdir()} & {"model.safetensors.tmp", "optimizer.pt.tmp", "checkpoint.json"}
    assert CliRunner().invoke(train_app, [*train_args, "--device", "cpu", "--quiet", "--resume"]).exit_code == 0

    def no_room(table, where, *args, **kwargs):
        Path(where).write_bytes(b"partial")
        raise OSError(code, os.strerror(code), str(where))

    monkeypatch.setattr(pyarrow.parquet, "write_table", no_room)
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_app, ["--checkpoint", str(run), "--cache", stores["reason"], "--out", str(out),
                                           "--figures", "0", "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: cannot write {out}: {fix}", result.output
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("damage", ["truncate-model", "truncate-optimizer", "pickled-code"])
def test_a_damaged_checkpoint_file_is_one_line(stores, tmp_path, damage):
    """Issue 24 row 7: a truncated model.safetensors / optimizer.pt, or an optimizer.pt holding a pickled
    os.system, is one line naming the file and what to do (lens-eval: exit 2); torch's advice to load it
    unsafely never shows, and the payload never runs."""
    from lens_train.cli import eval_app
    from lens_train.errors import UserError
    from lens_train.training.run_config import read_run_config
    from lens_train.training.trainer import build_model

    run = tmp_path / "r"
    args = ["--cache", stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "1", "--batch-size", "1",
            "--grad-accum", "1", "--workers", "0", "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(train_app, args).exit_code == 0
    target = run / ("model.safetensors" if damage == "truncate-model" else "optimizer.pt")
    if damage == "pickled-code":
        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        torch.save({"step": 1, "optimizer": Payload(), "rng": {}}, target)
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    if damage == "truncate-model":
        result = CliRunner().invoke(eval_app, ["--checkpoint", str(run), "--cache", stores["reason"], "--out",
                                               str(tmp_path / "eval"), "--figures", "0", "--device", "cpu"])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert line.count("\n") == 0
    else:  # what --resume loads
        config = read_run_config(run)
        with pytest.raises(UserError) as error:
            load_checkpoint(run, build_model(config.model, config.sam, seed=0), with_optimizer=True)
        line = str(error.value)
    assert str(target) in line and "weights_only" not in line
    assert "resume from an earlier copy of the run, or train again" in line
    assert not (tmp_path / "pwned").exists()


def test_outputs_inside_a_store_and_an_overwrite_that_would_delete_them_are_refused(stores, tmp_path):
    """Issue 24 row 2: a run or an evaluation written into a store is refused in one line, and
    lens-cache build --overwrite refuses a store folder that holds anything but the store."""
    import shutil

    from lens_cache.errors import StoreError
    from lens_cache.store_location import StoreLocation, foreign_entries, store_around
    from lens_cache.store_writer import prepare_store
    from lens_train.cli import eval_app

    store = tmp_path / "store"
    shutil.copytree(stores["train"], store)
    assert store_around(store / "runs" / "x") == store and store_around(tmp_path) is None
    for out in (store, store / "sub" / "run"):
        result = CliRunner().invoke(train_app, ["--cache", str(store), "--preset", "tiny", "--out", str(out),
                                                "--steps", "1", "--workers", "0", "--device", "cpu", "--quiet"])
        assert result.exit_code == 2 and f"is inside the feature store {store}" in result.output, result.output
    run = tmp_path / "run"
    assert CliRunner().invoke(train_app, ["--cache", str(store), "--preset", "tiny", "--out", str(run), "--steps", "1",
                                          "--batch-size", "1", "--grad-accum", "1", "--workers", "0", "--device",
                                          "cpu", "--quiet"]).exit_code == 0
    result = CliRunner().invoke(eval_app, ["--checkpoint", str(run), "--cache", str(store), "--out", str(store / "ev"),
                                           "--figures", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "is inside the feature store" in result.output
    assert not (store / "ev").exists()
    # a run written there before this check existed: --overwrite would have deleted it with the store
    (store / "config.json").write_text("{}")
    assert foreign_entries(StoreLocation(str(store))) == ["config.json"]
    with pytest.raises(StoreError, match=r"holds files that are not part of the store \(config.json\)"):
        prepare_store(StoreLocation(str(store)), None, manifest=None, plan=None, text_len=None, overwrite=True)
    assert (store / "config.json").exists() and (store / "zarr.json").exists()
