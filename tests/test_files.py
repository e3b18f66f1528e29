"""lens_core.files: every stage writes files and folders so that a failure leaves the old
version and no temporary behind (one rule, used by manifests, stores, runs and exports).
lens_core.paths: every stage confines the paths a file names to their folder (one rule, used by the
manifests' adapters and stage 2's MME and routing readers; their own tests check how each reports it)."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens_core.files import folder_replaced_on_success, replaced_on_success, write_text_atomically
from lens_core.paths import UnsafePathError, path_inside
from lens_manifests.manifest_file import write_manifest


def _full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_text_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_text_atomically(path, "old\n")
    write_text_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(RuntimeError), replaced_on_success(path) as tmp:
        tmp.write_text("half of a")
        raise RuntimeError("the writer died")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with folder_replaced_on_success(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing under the name until the block ends
    assert (out / "a.txt").read_text() == "1"

    with folder_replaced_on_success(out) as tmp:  # an existing folder is replaced, not merged
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]

    with pytest.raises(OSError), folder_replaced_on_success(out) as tmp:
        (tmp / "c.txt").write_text("3")
        _full_disk()
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_manifest_that_fails_to_write_leaves_the_old_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.parquet"
    table = pa.table({"x": [1, 2]})
    from lens_manifests import manifest_file

    monkeypatch.setattr(manifest_file, "canonical", lambda t: t)  # a toy table, not the manifest schema
    write_manifest(table, path)
    before = path.read_bytes()

    def half_then_full(t, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        _full_disk()

    monkeypatch.setattr(pq, "write_table", half_then_full)
    with pytest.raises(OSError, match="No space"):
        write_manifest(pa.table({"x": [3]}), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]


@pytest.mark.parametrize("name, why", [
    ("/etc/passwd", "it is absolute"), ("", "it is empty"), (None, "it is empty"), (3, "it is empty"),
    ("a\x00.jpg", "it holds a NUL byte"), ("../x.jpg", "its '..' climbs out"), ("a/../../x.jpg", "its '..' climbs out"),
    (".", "it names the folder itself"), ("sub/..", "it names the folder itself"),
])
def test_a_name_that_is_no_relative_path_inside_is_refused(tmp_path: Path, name, why) -> None:
    with pytest.raises(UnsafePathError) as info:
        path_inside(tmp_path, name)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert message == (f"file name {name!r} is not a path inside {tmp_path} ({why}): "
                       "the dataset file names a path outside its folder; not read")


def test_symlinks_are_followed_and_must_stay_inside(tmp_path: Path) -> None:
    """The stricter of the two rules the project had: the path, symlinks followed, stays inside the resolved
    folder; the folder may itself be (or lie under) a link; the path returned is the joined one, not resolved."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (tmp_path / "outside.jpg").write_bytes(b"o")
    assert path_inside(root, "sub/../a.jpg") == root / "a.jpg"  # normalised text, inside
    assert path_inside(root, "missing.jpg") == root / "missing.jpg"  # existence is the reader's business
    (root / "inner.jpg").symlink_to(root / "a.jpg")
    assert path_inside(root, "inner.jpg") == root / "inner.jpg"  # a link inside the folder: fine
    (root / "out.jpg").symlink_to(tmp_path / "outside.jpg")
    with pytest.raises(UnsafePathError) as info:
        path_inside(root, "out.jpg", what="image", folder_is="the data root")
    assert str(info.value) == (
        f"image 'out.jpg' is not a path inside {root}: it leads to {tmp_path / 'outside.jpg'} through a symlink, "
        f"outside the data root; copy the file into {root} instead of linking to it")
    (root / "away").symlink_to(tmp_path, target_is_directory=True)  # a linked folder that leads out
    with pytest.raises(UnsafePathError, match="through a symlink"):
        path_inside(root, "away/outside.jpg")
    assert path_inside(root, "sub/../away/root/a.jpg") == root / "away/root/a.jpg"  # out and back in: inside
    linked = tmp_path / "linked"
    linked.symlink_to(root, target_is_directory=True)  # the folder itself is a link: resolved first
    assert path_inside(linked, "a.jpg") == linked / "a.jpg"
    assert path_inside(linked, "inner.jpg") == linked / "inner.jpg"
    with pytest.raises(UnsafePathError, match="through a symlink"):
        path_inside(linked, "out.jpg")
