"""A disk that fills during (or before) `lens-cache export`: one line, exit 2, nothing left (issue 24 row 8).

A real full disk: a 300 KiB tmpfs mounted for the test (root only, as CI and the developers' machines run;
elsewhere skipped). The command runs as a subprocess, since the failure used to crash the interpreter at exit
(HDF5's teardown after a failed write: exit 139) after six tracebacks, leaving ``x.h5.tmp`` and ``x.h5.lock``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from lens_cache.testing import fake_factory, make_test_manifest

LENS_CACHE = [sys.executable, "-c", "from lens_cache.cli import app; app()"]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from lens_cache.build import build_cache

    root = tmp_path_factory.mktemp("full-disk")
    manifest = make_test_manifest(root / "images", num_images=6, seed=5)
    return build_cache(manifest, root / "store", fake_factory(layers=(14, 30)), spec="testset:val", block_size=2,
                       progress=False)  # about 13 MB: far more than the disk holds


def _export(store, target):
    return subprocess.run([*LENS_CACHE, "export", store.url, str(target), "--compression", "none"],
                          capture_output=True, text=True, timeout=300)


def test_disk_filling_during_export(store, small_disk):
    done = _export(store, small_disk / "x.h5")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.strip() == (f"error: cannot write {small_disk / 'x.h5'}: no space left on the device: "
                                   "free some space or write elsewhere")
    assert sorted(p.name for p in small_disk.iterdir()) == []  # no x.h5, x.h5.tmp, x.h5.lock


def test_disk_full_before_export(store, small_disk):
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # the disk is full
        pass
    finally:
        os.close(fd)
    done = _export(store, small_disk / "x.h5")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.strip().startswith(f"error: cannot write {small_disk / 'x.h5'}: no space left on the device")
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
