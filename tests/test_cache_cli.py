"""``lens-cache`` commands (with the fake backbone) and the HDF5 export."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import h5py
import lens_cache.backbones
import numpy as np
import pytest
from lens_cache.cli import app
from lens_cache.export import export_hdf5, read_hdf5_attrs
from lens_cache.store import FeatureStore
from lens_cache.testing import damage_chunk, fake_build_extractor, make_test_manifest
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture()
def fake_backbones(monkeypatch):
    """``lens-cache build`` imports build_extractor lazily; give it the fake one."""
    monkeypatch.setattr(lens_cache.backbones, "build_extractor", fake_build_extractor, raising=False)


@pytest.fixture(scope="module")
def manifest_file(tmp_path_factory):
    from lens_manifests import write_manifest

    folder = tmp_path_factory.mktemp("data")
    table = make_test_manifest(folder / "images", num_images=6, seed=4, corrupt=[2])
    path = folder / "manifest.parquet"
    write_manifest(table, path, spec="testset:val")
    return path


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_build_info_verify_export(fake_backbones, manifest_file, tmp_path):
    out = tmp_path / "store"
    result = runner.invoke(
        app, ["build", "--manifest", str(manifest_file), "--out", str(out), "--block-size", "4", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    assert store.attrs["spec"] == "testset:val" and store.identity["mllm"]["name"] == "fake-toy"
    assert list(store.layers) == [3]  # the default backbones are the toy ones, at the toy preset's main layer

    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "complete     True (2/2 blocks" in result.stdout
        and "per image" in result.stdout
        and "per query" in result.stdout
    )

    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0 and result.stdout.strip().endswith("OK")
    assert "skipped image 2 (img_0002, unreadable)" in result.stdout

    result = runner.invoke(app, ["build", "--manifest", str(manifest_file), "--out", str(out), "--layers", "3,4"])
    assert one_line_error(result) == (
        f"error: store {out} was built with layers [3] but this build asks for [3, 4]: use another --out or --overwrite"
    )

    result = runner.invoke(app, ["export", str(out), str(tmp_path / "store.h5")])
    assert result.exit_code == 0, result.output


def test_build_limit(fake_backbones, manifest_file, tmp_path):
    result = runner.invoke(
        app, ["build", "--manifest", str(manifest_file), "--out", str(tmp_path / "s"), "--limit", "2", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(tmp_path / "s").num_images == 2
    result = runner.invoke(app, ["verify", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output  # the recorded manifest hash matches manifest.parquet


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["info", "{tmp}/nothing"], "error: no feature store at {tmp}/nothing"),
        (["verify", "{tmp}/nothing"], "error: no feature store at {tmp}/nothing"),
        (
            ["build", "--manifest", "{tmp}/missing.parquet", "--out", "{tmp}/s"],
            "error: manifest {tmp}/missing.parquet not found",
        ),
        (
            ["build", "--split", "synthetic:val", "--out", "{tmp}/s", "--layers", "x"],
            "error: --layers takes a comma-separated list",
        ),
        (["build", "--split", "nosuchset", "--out", "{tmp}/s"], "error: unknown dataset 'nosuchset'"),
        (
            ["build", "--split", "refcoco", "--data-root", "{tmp}/nodata", "--out", "{tmp}/s"],
            "error: data root {tmp}/nodata not found",
        ),
        (["build", "--out", "{tmp}/s"], "error: give --split SPEC"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(fake_backbones, tmp_path, args, expected):
    result = runner.invoke(app, [arg.format(tmp=tmp_path) for arg in args])
    assert one_line_error(result).startswith(expected.format(tmp=tmp_path))


def test_out_is_required_and_device_is_resolved_as_in_stage_two(fake_backbones, manifest_file, tmp_path):
    import torch

    result = runner.invoke(app, ["build", "--manifest", str(manifest_file)])
    assert result.exit_code == 2 and "Missing option '--out'" in result.output
    args = ["build", "--manifest", str(manifest_file), "--out", str(tmp_path / "s"), "--quiet", "--device"]
    for device in ("tpu", "meta"):
        assert one_line_error(runner.invoke(app, [*args, device])) == (
            f"error: --device takes cpu, cuda or cuda:N, got '{device}'")
    if not torch.cuda.is_available():
        assert one_line_error(runner.invoke(app, [*args, "cuda"])) == (
            "error: --device cuda but no CUDA device is visible: use --device cpu")
    assert not (tmp_path / "s").exists()


def test_verify_reports_an_unfinished_store(fake_backbones, manifest_file, tmp_path):
    out = tmp_path / "store"
    assert (
        runner.invoke(
            app, ["build", "--manifest", str(manifest_file), "--out", str(out), "--block-size", "2", "--quiet"]
        ).exit_code
        == 0
    )
    store = FeatureStore.open(out)
    store.array("blocks/done")  # open before editing through zarr directly
    import zarr

    zarr.open_array(str(out / "blocks" / "done"), mode="r+")[0] = 0
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    assert "PROBLEM: 1 block(s) not written" in result.stdout


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The console entry point itself (not CliRunner): exit code 2, one line, no traceback."""
    process = subprocess.run(
        [sys.executable, "-m", "lens_cache.cli", "info", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert process.returncode == 2
    assert (
        process.stderr.strip()
        == f"error: no feature store at {tmp_path / 'nothing'}: build it with `lens-cache build ... --out {tmp_path / 'nothing'}`"
    )


def test_hdf5_export_round_trip(tmp_path):
    from lens_cache.build import build_cache
    from lens_cache.testing import fake_factory

    manifest = make_test_manifest(tmp_path / "images", num_images=5, seed=5, missing=[3])
    store = build_cache(
        manifest, tmp_path / "store", fake_factory(layers=(14, 30)), spec="testset:val", block_size=2, progress=False
    )
    out = export_hdf5(store.url, tmp_path / "export" / "store.h5", compression="lzf")
    assert out.exists() and not out.with_name("store.h5.tmp").exists()
    assert read_hdf5_attrs(out) == store.attrs
    with h5py.File(out, "r") as h5:
        names = []
        h5.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        assert sorted(n for n in names if n != "manifest.parquet") == store.array_names()
        for name in store.array_names():
            exported, original = h5[name][()], store.array(name)[:]
            assert exported.dtype == original.dtype and exported.tobytes() == original.tobytes(), name
            assert h5[name].chunks == tuple(
                min(c, s) for c, s in zip(store.array(name).chunks, original.shape, strict=True)
            )
        assert bytes(h5["manifest.parquet"][()]) == store.location.read_bytes("manifest.parquet")
        assert json.loads(h5.attrs["lens_cache"])["complete"] is True


def test_end_to_end_with_the_tiny_backbones(tmp_path):
    """The real chain: synthetic data -> manifest -> tiny LLaVA + tiny SAM -> store -> verify."""
    from lens_manifests.synthetic import write_synthetic

    write_synthetic(tmp_path / "data", seed=0, num_train_images=1, num_val_images=2, num_test_images=1, workers=1)
    out = tmp_path / "store"
    args = ["build", "--split", "synthetic-refer:val", "--data-root", str(tmp_path / "data"), "--out", str(out),
            "--mllm", "tiny", "--sam", "tiny"]
    result = runner.invoke(app, [*args, "--limit", "2", "--block-size", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    assert store.identity["name_or_path"] == "tiny" and store.num_images == 2 and list(store.layers) == [14]
    sample = store.read_query(0, 14)
    assert sample["image_states"].shape == (576, store.hidden_size)
    assert sample["sam_embedding"].shape == (256, 64, 64)
    assert np.isfinite(sample["text_states"].astype(np.float32)).all()
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


def test_verify_reads_every_value_and_build_repairs(fake_backbones, manifest_file, tmp_path):
    """`verify` reads every value (progress on stderr), `--quick` only the structure; `build` repairs."""
    out = tmp_path / "store"
    build = ["build", "--manifest", str(manifest_file), "--out", str(out), "--block-size", "2", "--layers", "14",
             "--quiet"]
    assert runner.invoke(app, build).exit_code == 0
    damage_chunk(out / "images" / "mllm_l14" / "c" / "3" / "0" / "0", "flipped")  # image 3: block 1

    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1, result.output
    assert "PROBLEM: block 1: image 3: images/mllm_l14: checksum mismatch, its bytes changed" in result.stdout
    assert "[lens-cache verify] 6/6 images (100.0%)" in result.stderr
    quick = runner.invoke(app, ["verify", str(out), "--quick"])
    # a damaged value is not seen by --quick, and its OK says so (issue 24: a bare OK read as "intact")
    assert quick.exit_code == 0 and quick.stdout.strip().splitlines()[-1] == (
        "OK (structure only: no value was read; run without --quick to check every sample)")

    result = runner.invoke(app, build[:-1])  # the same command again, with progress
    assert result.exit_code == 0, result.output
    assert "block 1 of" in result.stderr and "is damaged (image 3: images/mllm_l14: checksum mismatch" in result.stderr
    assert runner.invoke(app, ["verify", str(out), "--quiet"]).stdout.strip().endswith("OK")


def test_a_writer_lock_held_elsewhere_is_one_line(fake_backbones, manifest_file, tmp_path):
    """A store or export file another process writes: one line naming it (pid, host), exit 2."""
    from lens_cache.locks import WriterLock

    out = tmp_path / "store"
    with WriterLock(out, command="lens-cache build"):  # this process; the command opens the lock file anew
        line = one_line_error(runner.invoke(app, ["build", "--manifest", str(manifest_file), "--out", str(out)]))
    assert line.startswith(f"error: {out} is in use by lens-cache build (pid {os.getpid()} on {socket.gethostname()}")
    assert runner.invoke(app, ["build", "--manifest", str(manifest_file), "--out", str(out), "--quiet"]).exit_code == 0
    h5 = tmp_path / "store.h5"
    with WriterLock(h5, command="lens-cache export"):
        line = one_line_error(runner.invoke(app, ["export", str(out), str(h5)]))
    assert line.startswith(f"error: {h5} is in use by lens-cache export (pid {os.getpid()}") and not h5.exists()


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError(2, "No such file", "/x"), KeyError("k")])
def test_a_bug_keeps_its_traceback(fake_backbones, manifest_file, tmp_path, monkeypatch, bug):
    """Only user errors become one line: a ValueError/FileNotFoundError from a bug is not one."""
    import lens_cache.build

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(lens_cache.build, "build_cache", broken)
    result = runner.invoke(app, ["build", "--manifest", str(manifest_file), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and result.exception is bug  # typer re-raises: the traceback is printed
    assert "error: " not in result.stderr


def test_bad_samples_are_skipped_and_listed_the_rest_is_built(tmp_path):
    """Issue 11: a 1x3000 JPEG stopped the build ("height and width must be > 0", store incomplete) and a
    text holding <image> refused the whole split. Now each bad image, query and polygon is skipped and
    listed (store and `info`), with the real tiny backbones, and the rest is cached."""
    from PIL import Image

    split = tmp_path / "data" / "reason_seg" / "ReasonSeg" / "train"
    split.mkdir(parents=True)

    def item(name: str, size: tuple[int, int], texts: list[str], points: list) -> None:
        Image.new("RGB", size, (200, 40, 40)).save(split / f"{name}.jpg")
        shapes = [{"label": "target", "points": points}]
        (split / f"{name}.json").write_text(json.dumps({"text": texts, "is_sentence": False, "shapes": shapes}))

    item("good", (40, 30), ["the red box", "the <image> box"], [[2, 2], [30, 2], [30, 20]])
    item("nan", (40, 30), ["the dot"], [[1, 1], [float("nan"), 5], [9, 9]])
    item("thin", (3000, 1), ["the strip"], [[0, 0], [2999, 0], [10, 0]])
    out = tmp_path / "store"
    result = runner.invoke(app, ["build", "--split", "reasonseg:train", "--data-root", str(tmp_path / "data"),
                                 "--out", str(out), "--device", "cpu", "--quiet", "--mllm", "tiny", "--sam", "tiny"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(out)
    assert store.complete and (store.num_images, store.num_queries) == (2, 3)
    assert [(f["image_id"], f["reason"]) for f in store.failed_images()] == [("thin", "bad_geometry")]
    assert [(f["query_id"], f["text"], f["reason"]) for f in store.failed_queries()] == [(1, "the <image> box", "bad_text")]
    assert store.valid_query_ids().tolist() == [0] and store.array("queries/failed")[:].tolist() == [0, 5, 4]
    store.read_query(0, 14)

    info = runner.invoke(app, ["info", str(out)]).stdout
    assert "failed       1 image(s) and 1 other query(ies) skipped; 1 item(s) left out of the manifest" in info
    assert f"skipped image 1 (thin, bad_geometry): {split / 'thin.jpg'}" in info
    assert "skipped query 1 (image good, bad_text): 'the <image> box'" in info
    assert f"left out of the manifest: {split / 'nan.json'}: unusable shapes (polygon has coordinates" in info
    assert runner.invoke(app, ["verify", str(out), "--quiet"]).exit_code == 0


DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EROFS: "read-only file system: write elsewhere",
}


def leftovers(root) -> list[str]:
    """Temporary files under ``root`` (ours: *.tmp; zarr's: *.partial)."""
    return sorted(str(p) for p in root.rglob("*") if p.suffix in (".tmp", ".partial") or ".tmp." in p.name)


def fail_after_partial_write(code: int):
    """A stand-in for a library's ``write(data, path)``: writes a few bytes to ``path``, then fails like the disk."""

    def write(data, where, *args, **kwargs):
        with open(where, "wb") as file:
            file.write(b"partial")
        raise OSError(code, os.strerror(code), str(where))

    return write


@pytest.mark.parametrize("code", sorted(DISK_ERRORS))
@pytest.mark.parametrize("command", ["build-chunks", "build-files", "manifest", "export"])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_no_tmp(
    fake_backbones, manifest_file, tmp_path, monkeypatch, command, code
):
    """Issue 11: disk full (ENOSPC) or read-only output (EROFS) gave tracebacks and left .tmp files.
    Now: one line naming the output and the fix, exit 2, no temporary file left."""
    import pathlib

    import pyarrow.parquet
    import zarr

    out = tmp_path / "out"
    args = ["build", "--manifest", str(manifest_file), "--out", str(out), "--quiet"]
    if command == "build-chunks":  # the features themselves: zarr's chunk writes fail
        real_set = zarr.storage.LocalStore.set

        async def set_chunk(self, key, value):
            if "/c/" in key:
                raise OSError(code, os.strerror(code), str(self.root / key))
            return await real_set(self, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", set_chunk)
    elif command == "build-files":  # the store's own files (manifest.parquet, the warm start)
        monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, data: fail_after_partial_write(code)(data, self))
    elif command == "manifest":
        from PIL import Image

        split = tmp_path / "data" / "reason_seg" / "ReasonSeg" / "val"
        split.mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(split / "a.jpg")
        (split / "a.json").write_text(json.dumps({"text": ["it"], "shapes": []}))
        monkeypatch.setattr(pyarrow.parquet, "write_table", fail_after_partial_write(code))
        out = tmp_path / "m.parquet"
        args = ["manifest", "--split", "reasonseg:val", "--data-root", str(tmp_path / "data"), "-o", str(out)]
    else:
        store = tmp_path / "store"
        assert runner.invoke(app, ["build", "--manifest", str(manifest_file), "--out", str(store), "--quiet"]).exit_code == 0

        def no_room(self, *args, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(h5py.Dataset, "__setitem__", no_room)
        out = tmp_path / "store.h5"
        args = ["export", str(store), str(out)]
    line = one_line_error(runner.invoke(app, args))
    assert line == f"error: cannot write {out}: {DISK_ERRORS[code]}"
    assert leftovers(tmp_path) == []
    assert command.startswith("build") or not out.exists()


def test_an_out_under_a_file_is_one_line(fake_backbones, manifest_file, tmp_path):
    """Issue 24 row 10: --out afile/sub where afile is a file: one line naming it, exit 2, not a traceback;
    the same error type raised for a path that is not under --out stays a bug (traceback)."""
    from lens_cache.cli import as_user_error

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = runner.invoke(app, ["build", "--manifest", str(manifest_file), "--out", str(blocker / "sub"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert one_line_error(result) == f"error: cannot write {blocker / 'sub'}: {blocker} is a file, not a folder: choose another --out"
    elsewhere = FileExistsError(17, "File exists", str(blocker))
    assert as_user_error(elsewhere, tmp_path / "other" / "out") is None
    assert as_user_error(elsewhere, blocker / "sub") is not None


def test_export_refuses_to_replace_what_is_not_its_own(tmp_path):
    """Issue 24 row 4: an unrelated existing file needs --overwrite; the store itself or any folder as the
    target is one line; an earlier export of the same store is replaced."""
    from lens_cache.build import build_cache
    from lens_cache.testing import fake_factory

    manifest = make_test_manifest(tmp_path / "images", num_images=2, seed=5)
    store = build_cache(manifest, tmp_path / "s", fake_factory(), spec="testset:val", block_size=2, progress=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = runner.invoke(app, ["export", store.url, str(notes)])
    assert result.exit_code == 2 and "exists and is not an export of this store" in one_line_error(result)
    assert notes.read_text() == "mine"
    result = runner.invoke(app, ["export", store.url, store.url])
    assert result.exit_code == 2 and one_line_error(result).endswith(
        "is a folder (the store itself): give the path of the HDF5 file to write, e.g. store.h5")
    assert runner.invoke(app, ["export", store.url, str(tmp_path / "a.h5")]).exit_code == 0
    assert runner.invoke(app, ["export", store.url, str(tmp_path / "a.h5")]).exit_code == 0  # its own: replaced
    assert runner.invoke(app, ["export", store.url, str(notes), "--overwrite"]).exit_code == 0
    assert read_hdf5_attrs(notes)["identity_hash"] == store.identity_hash
