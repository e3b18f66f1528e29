"""lens-train's refusals, each one line on stderr (exit 2): the device, stores of other backbones or layers, presets
that do not fit, an incomplete or damaged store, a run in use or changed on resume, a full or read-only disk, a
damaged checkpoint, outputs inside a store; and a bug, which keeps its traceback. What a run does:
test_train_trainer.py (the stores of both: tests/helpers/fake_stores.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lens_train.training.trainer as trainer_module
from lens_train.training.checkpoint import checkpoint_step, load_checkpoint
from lens_train.cli import train_app
from lens_train.training.trainer import train
from tests.helpers.fake_stores import cli_error, train_request


@pytest.mark.parametrize(("device", "expected"), [
    ("tpu", "error: --device takes cpu, cuda or cuda:N, got 'tpu'"),
    ("meta", "error: --device takes cpu, cuda or cuda:N, got 'meta'"),  # a torch device, not one to run on
    pytest.param("cuda", "error: --device cuda but no CUDA device is visible: use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")),
])
def test_device_is_resolved_as_in_stage_one(fake_stores, tmp_path, device, expected):
    """lens_cache.backbones.runtime.resolve_device, the one every command uses (lens-cache build: test_cache_cli)."""
    result = CliRunner().invoke(train_app, ["--cache", fake_stores["train"], "--preset", "tiny",
                                            "--out", str(tmp_path / "r"),
                                            "--device", device, "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == expected


def test_refuses_stores_of_different_backbones(fake_stores, tmp_path):
    line = cli_error(["--cache", fake_stores["train"], "--cache", fake_stores["other"], "--preset", "tiny",
                       "--out", str(tmp_path / "r")])
    assert "different backbones" in line and "'fake-mllm' vs 'another-mllm'" in line


def test_refuses_a_layer_the_store_lacks(fake_stores, tmp_path):
    line = cli_error(["--cache", fake_stores["train"], "--preset", "tiny", "--layer", "13",
                      "--out", str(tmp_path / "r")])
    assert "caches layer(s) [14], not 13: pass --layer 14" in line


def test_refuses_a_preset_of_another_width(fake_stores, tmp_path):
    line = cli_error(["--cache", fake_stores["train"], "--preset", "official", "--out", str(tmp_path / "r")])
    assert "was built with d=64 (fake-mllm backbone) but preset 'official' expects 4096: use --preset tiny" in line


def test_refuses_a_preset_of_another_image_grid(fake_stores, tmp_path):
    """The grid the head reads comes from the preset and must be the store's: 27 x 27 (LLaVA-OneVision) on a
    576-token store is one line, not a shape error at the first batch."""
    import json

    from lens_train.training.presets import PRESET_DIR

    preset = json.loads((PRESET_DIR / "tiny.json").read_text())
    preset["model"]["grid_size"] = 27
    path = tmp_path / "grid27.json"
    path.write_text(json.dumps(preset))
    line = cli_error(["--cache", fake_stores["train"], "--preset", str(path), "--out", str(tmp_path / "r")])
    assert "holds 576 image tokens per image but preset 'grid27' reads a 27 x 27 grid (729): " \
           "give a preset with model.grid_size 24" in line


def test_refuses_an_incomplete_store(fake_stores, tmp_path):
    line = cli_error(["--cache", fake_stores["incomplete"], "--preset", "tiny", "--out", str(tmp_path / "r")])
    assert "incomplete" in line and "lens-cache build" in line


def test_refuses_to_overwrite_or_change_a_run(fake_stores, tmp_path):
    run = tmp_path / "run"
    train(train_request(fake_stores, run, steps=1))
    line = cli_error(["--cache", fake_stores["train"], "--cache", fake_stores["reason"], "--preset", "tiny",
                      "--out", str(run)])
    assert "already holds a run" in line and "--resume" in line
    line = cli_error(["--cache", fake_stores["train"], "--cache", fake_stores["reason"], "--out", str(run), "--resume",
                       "--lr", "0.5"])
    assert "these training settings differ: lr 0.0003 -> 0.5" in line
    line = cli_error(["--cache", fake_stores["reason"], "--out", str(run), "--resume"])
    assert "needs the stores" in line
    line = cli_error(["--cache", fake_stores["train"], "--mix", "1:1", "--preset", "tiny",
                      "--out", str(tmp_path / "m")])
    assert "--mix takes three" in line


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
def test_a_damaged_store_is_refused_in_one_line(fake_stores, tmp_path, kind):
    """Issue 11: with every SAM chunk deleted lens-train trained on zeros; now it names the sample and the fix."""
    copy = _damaged_copy(fake_stores["train"], tmp_path, kind)
    line = cli_error(["--cache", str(copy), "--preset", "tiny", "--out", str(tmp_path / "run"), "--steps", "1",
                       "--batch-size", "1", "--grad-accum", "1", "--workers", "0"])
    assert line.startswith(f"error: store {copy}: ") and DAMAGE_FOUND[kind] in line
    if kind != "manifest":
        assert "image " in line.split(DAMAGE_FOUND[kind])[0]  # names the sample
    assert line.endswith(f"repair it by rerunning the `lens-cache build ... --out {copy}` command that made it "
                         "(it recomputes only the damaged blocks)")


def test_two_runs_on_one_out_folder(fake_stores, tmp_path):
    """Issue 11: two runs on one --out both ran and mixed their metrics; now the second is refused."""
    import signal
    import socket

    from lens_cache.testing import hold_lock

    run = tmp_path / "run"
    holder = hold_lock(run, "lens-train")
    try:
        line = cli_error(["--cache", fake_stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "1"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert line.startswith(f"error: {run} is in use by lens-train (pid {holder.pid} on {socket.gethostname()}, since ")
    assert not run.exists()

    # The holder died holding the lock: the next run takes it over (and says so), then removes it.
    lines: list[str] = []
    train(train_request(fake_stores, run, steps=1), log=lines.append)
    assert any(line.startswith(f"took over the lock of lens-train (pid {holder.pid} on") for line in lines)
    assert checkpoint_step(run) == 1 and not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError(2, "No such file", "/x")])
def test_a_bug_keeps_its_traceback(fake_stores, tmp_path, monkeypatch, bug):
    """Only user errors are one line; any other exception (a bug) reaches the user with its traceback."""
    def broken(request):
        raise bug

    monkeypatch.setattr(trainer_module, "train", broken)
    result = CliRunner().invoke(train_app, ["--cache", fake_stores["train"], "--preset", "tiny",
                                            "--out", str(tmp_path / "r")])
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

    import lens_core.files

    monkeypatch.setattr(lens_core.files, "open", lambda *a, **k: _FullDiskFile(builtins.open(*a, **k), 100),
                        raising=False)
    with pytest.raises(OSError) as error:
        lens_core.files.torch_save({"x": torch.zeros(1000)}, tmp_path / "x.pt")
    assert error.value.errno == errno.ENOSPC


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_no_tmp(fake_stores, tmp_path, monkeypatch, code):
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
    train_args = ["--cache", fake_stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "1",
                  "--batch-size", "1", "--grad-accum", "1", "--workers", "0"]
    with monkeypatch.context() as patch:
        patch.setattr(lens_train.training.checkpoint, "save_file", full_disk_save_file)
        assert cli_error(train_args) == f"error: cannot write {run}: {fix}"
    assert not {p.name for p in run.iterdir()} & {"model.safetensors.tmp", "optimizer.pt.tmp", "checkpoint.json"}
    assert CliRunner().invoke(train_app, [*train_args, "--device", "cpu", "--quiet", "--resume"]).exit_code == 0

    def no_room(table, where, *args, **kwargs):
        Path(where).write_bytes(b"partial")
        raise OSError(code, os.strerror(code), str(where))

    monkeypatch.setattr(pyarrow.parquet, "write_table", no_room)
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_app, ["--checkpoint", str(run), "--cache", fake_stores["reason"],
                                           "--out", str(out), "--figures", "0", "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: cannot write {out}: {fix}", result.output
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("damage", ["truncate-model", "truncate-optimizer", "pickled-code"])
def test_a_damaged_checkpoint_file_is_one_line(fake_stores, tmp_path, damage):
    """Issue 24 row 7: a truncated model.safetensors / optimizer.pt, or an optimizer.pt holding a pickled
    os.system, is one line naming the file and what to do (lens-eval: exit 2); torch's advice to load it
    unsafely never shows, and the payload never runs."""
    from lens_train.cli import eval_app
    from lens_train.errors import UserError
    from lens_train.training.run_config import read_run_config
    from lens_train.training.loading import build_model

    run = tmp_path / "r"
    args = ["--cache", fake_stores["train"], "--preset", "tiny", "--out", str(run), "--steps", "1", "--batch-size", "1",
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
        result = CliRunner().invoke(eval_app, ["--checkpoint", str(run), "--cache", fake_stores["reason"], "--out",
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


def test_outputs_inside_a_store_and_an_overwrite_that_would_delete_them_are_refused(fake_stores, tmp_path):
    """Issue 24 row 2: a run or an evaluation written into a store is refused in one line, and
    lens-cache build --overwrite refuses a store folder that holds anything but the store."""
    import shutil

    from lens_cache.errors import StoreError
    from lens_cache.store_location import StoreLocation, foreign_entries, store_around
    from lens_cache.store_writer import prepare_store
    from lens_train.cli import eval_app

    store = tmp_path / "store"
    shutil.copytree(fake_stores["train"], store)
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
