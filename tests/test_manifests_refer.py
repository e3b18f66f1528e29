"""REFER adapter on a tiny fixture in the REFER API layout (refs pickle + COCO instances.json)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from lens_manifests import ManifestError, build_manifest, decode_target, encode_mask, get_skipped
from lens_manifests.refer import load_refer, ref_in_split


def _sent(sid: int, text: str) -> dict:
    return {"sent": text, "raw": text, "sent_id": sid, "tokens": text.split()}


def _write_refer(root: Path, name: str = "refcoco", split_by: str = "unc") -> Path:
    ds = root / "refer_seg" / name
    ds.mkdir(parents=True)
    (root / "refer_seg" / "images" / "mscoco" / "images" / "train2014").mkdir(parents=True)
    rle_mask = np.zeros((10, 12), dtype=bool)
    rle_mask[2:5, 3:9] = True  # 3 x 6 = 18 px
    images = [
        {"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 10, "width": 12},
        {"id": 40, "file_name": "COCO_train2014_000000000040.jpg", "height": 8, "width": 8},
    ]
    annotations = [
        # polygon (COCO rule: this 4x4 square covers 16 pixels)
        {"id": 100, "image_id": 5, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]], "bbox": [1, 1, 4, 4]},
        # compressed RLE, as a dict with a str counts
        {"id": 101, "image_id": 5, "category_id": 1,
         "segmentation": {"size": [10, 12], "counts": encode_mask(rle_mask)}, "bbox": [3, 2, 6, 3]},
        # uncompressed RLE (run lengths, column-major): 8x8 image, first 10 pixels background, then 6 foreground
        {"id": 102, "image_id": 40, "category_id": 2, "segmentation": {"size": [8, 8], "counts": [10, 6, 48]},
         "bbox": [1, 2, 1, 6]},
    ]  # fmt: skip
    (ds / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]})
    )
    refs = [
        # listed out of order on purpose: the manifest sorts by image then ref id
        {"ref_id": 2, "ann_id": 101, "image_id": 5, "split": "train", "category_id": 1,
         "sentences": [_sent(20, "the wide box"), _sent(21, "  the rle one "), _sent(22, "")]},
        {"ref_id": 1, "ann_id": 100, "image_id": 5, "split": "train", "category_id": 1,
         "sentences": [_sent(10, "left square")]},
        {"ref_id": 3, "ann_id": 102, "image_id": 40, "split": "testA", "category_id": 2,
         "sentences": [_sent(30, "the thin bar"), _sent(31, "bar")]},
        {"ref_id": 4, "ann_id": 100, "image_id": 5, "split": "val", "category_id": 1,
         "sentences": [_sent(40, "square again")]},
    ]  # fmt: skip
    with open(ds / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root


def test_every_sentence_is_a_row_grouped_by_image(tmp_path: Path) -> None:
    root = _write_refer(tmp_path)
    table = load_refer(root, "refcoco", "train")
    rows = table.to_pylist()
    assert [r["text"] for r in rows] == ["left square", "the wide box", "the rle one"]  # empty sentence dropped
    assert [r["source_id"] for r in rows] == ["ref:1/sent:10", "ref:2/sent:20", "ref:2/sent:21"]
    assert [r["query_id"] for r in rows] == [0, 1, 2]
    assert {(r["dataset"], r["task"], r["split"], r["is_sentence"]) for r in rows} == {
        ("refcoco", "referring", "train", False)
    }
    assert rows[0]["image_path"] == os.path.abspath(
        root / "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000005.jpg"
    )
    assert (rows[0]["height"], rows[0]["width"], rows[0]["image_id"]) == (10, 12, "5")
    square = decode_target(rows[0])
    assert (square == 1).sum() == 16 and square[1:5, 1:5].all()
    wide = decode_target(rows[1])
    assert (wide == 1).sum() == 18 and wide[2:5, 3:9].all()
    assert rows[1]["mask_rle"] == rows[2]["mask_rle"] and rows[0]["ignore_rle"] is None


def test_splits_are_filtered_like_the_refer_api(tmp_path: Path) -> None:
    root = _write_refer(tmp_path)
    assert load_refer(root, "refcoco", "val").column("text").to_pylist() == ["square again"]
    test_a = load_refer(root, "refcoco", "testA").to_pylist()
    assert [r["text"] for r in test_a] == ["the thin bar", "bar"]
    bar = decode_target(test_a[0])
    assert (bar == 1).sum() == 6 and bar[2:8, 1].all()  # column-major runs: column 1, rows 2..7
    assert load_refer(root, "refcoco", "testB").num_rows == 0
    assert ref_in_split("testAB", "testB") and ref_in_split("testB", "test") and not ref_in_split("val", "test")
    with pytest.raises(ManifestError, match=r"unknown split 'bogus'.*splits testA, train, val"):
        load_refer(root, "refcoco", "bogus")


def test_registry_refcoco_and_refcocog_split_by(tmp_path: Path) -> None:
    root = _write_refer(tmp_path)
    assert build_manifest("refcoco:testA", root).num_rows == 2
    assert build_manifest("refcoco", root).num_rows == 3
    # refcocog reads refs(umd).p: a fixture with only refs(unc).p must fail naming the file
    (root / "refer_seg" / "refcocog").mkdir()
    with pytest.raises(ManifestError, match=r"refs\(umd\)\.p not found; point --data-root at LISA's dataset folder"):
        build_manifest("refcocog:val", root)
    with pytest.raises(ManifestError, match="unknown split 'testA' for refcocog"):
        build_manifest("refcocog:testA", root)


def test_generic_name_needs_explicit_image_dir(tmp_path: Path) -> None:
    root = _write_refer(tmp_path, name="myrefs")
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    with pytest.raises(ManifestError, match="not a known one"):
        load_refer(root, "myrefs", "train")
    table = load_refer(root, "myrefs", "train", split_by="unc", image_dir=image_dir, dataset="mine")
    assert table.num_rows == 3 and set(table.column("dataset").to_pylist()) == {"mine"}
    assert table.column("image_path")[0].as_py().startswith(os.path.abspath(image_dir))


def test_missing_annotation_is_skipped_and_reported(tmp_path: Path) -> None:
    root = _write_refer(tmp_path)
    refs_path = root / "refer_seg" / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[0]["ann_id"] = 999
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    table = load_refer(root, "refcoco", "train")
    assert table.column("text").to_pylist() == ["left square"]
    assert [s["reason"] for s in get_skipped(table)] == ["annotation 999 missing"]


def test_malicious_refs_pickle_is_refused(tmp_path: Path) -> None:
    root = _write_refer(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "refer_seg" / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(ManifestError, match="refusing to load global"):
        build_manifest("refcoco:val", root)
    assert not marker.exists()


def test_refclef_images_in_saiapr_subfolders(tmp_path: Path) -> None:
    root = _write_refer(tmp_path, name="refclef")
    inst_path = root / "refer_seg/refclef/instances.json"
    inst = json.loads(inst_path.read_text())
    inst["images"][0]["file_name"] = "25421.jpg"
    inst_path.write_text(json.dumps(inst))
    nested = root / "refer_seg/images/saiapr_tc-12/25/images/25421.jpg"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"")
    paths = build_manifest("refclef:train", root).column("image_path").to_pylist()
    assert paths[0] == os.path.abspath(nested)


def _write_one_image_refer(root: Path, image: dict, segmentation: list | dict | None = None) -> Path:
    """A refcoco folder whose val split is one ref of one annotation on ``image``."""
    ds = root / "refer_seg" / "refcoco"
    ds.mkdir(parents=True)
    (root / "refer_seg" / "images" / "mscoco" / "images" / "train2014").mkdir(parents=True)
    ann = {"id": 1, "segmentation": [] if segmentation is None else segmentation}
    (ds / "instances.json").write_text(json.dumps({"images": [image], "annotations": [ann]}, separators=(",", ":")))
    refs = [{"ref_id": 1, "ann_id": 1, "image_id": image["id"], "split": "val", "sentences": [_sent(1, "it")]}]
    (ds / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return ds / "instances.json"


def test_a_huge_declared_size_is_skipped_within_a_memory_cap(tmp_path: Path) -> None:
    """Issue 11: a ~110-byte instances.json declaring 65000x65000 with an empty segmentation made
    `lens-cache manifest` allocate 3.9 GiB and die; now the row is skipped, under a 2 GiB address-space cap."""
    import resource
    import subprocess
    import sys

    instances = _write_one_image_refer(tmp_path, {"id": 1, "file_name": "a.jpg", "height": 65000, "width": 65000})
    assert instances.stat().st_size < 160

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    out = tmp_path / "m.parquet"
    process = subprocess.run(
        [sys.executable, "-m", "lens_cache", "manifest", "--split", "refcoco:val", "--data-root", str(tmp_path),
         "-o", str(out)],
        preexec_fn=cap, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    from lens_manifests import read_manifest

    table = read_manifest(out)
    assert table.num_rows == 0
    assert [s["reason"] for s in get_skipped(table)] == [
        "declared size 65000x65000 exceeds the limit of 16384 px per side (set LENS_MAX_IMAGE_SIDE to change it)"
    ]


def test_declared_size_is_checked_against_the_image_header_and_the_limit(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    _write_one_image_refer(tmp_path, {"id": 1, "file_name": "a.jpg", "height": 300, "width": 400})
    Image.new("RGB", (40, 30)).save(tmp_path / "refer_seg/images/mscoco/images/train2014/a.jpg")
    assert [s["reason"] for s in get_skipped(build_manifest("refcoco:val", tmp_path))] == [
        "declared size 300x400 differs from the image's own 30x40"
    ]
    Image.new("RGB", (400, 300)).save(tmp_path / "refer_seg/images/mscoco/images/train2014/a.jpg")
    assert build_manifest("refcoco:val", tmp_path).num_rows == 1
    monkeypatch.setenv("LENS_MAX_IMAGE_SIDE", "256")
    assert "exceeds the limit of 256 px" in get_skipped(build_manifest("refcoco:val", tmp_path))[0]["reason"]


@pytest.mark.parametrize("file_name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../../x.jpg"])
def test_a_file_name_outside_the_image_folder_is_skipped_never_read(tmp_path: Path, monkeypatch, file_name) -> None:
    """Issue 11: a REFER file_name of ../../../../etc/passwd was read and cached."""
    import lens_manifests.common

    opened: list[Path] = []  # images whose header was read
    real_header = getattr(lens_manifests.common, "image_header", None)
    monkeypatch.setattr(lens_manifests.common, "image_header", lambda path: opened.append(path) or real_header(path),
                        raising=False)
    _write_one_image_refer(tmp_path, {"id": 1, "file_name": file_name, "height": 10, "width": 10})
    table = build_manifest("refcoco:val", tmp_path)
    assert table.num_rows == 0 and opened == []
    (skipped,) = get_skipped(table)
    assert skipped["path"].endswith("instances.json#image:1")
    assert skipped["reason"].startswith(f"file name {file_name!r} is not a path inside ")


def test_an_image_linked_from_outside_the_data_root_is_skipped_a_linked_root_works(tmp_path: Path) -> None:
    """Issue 22: the manifests follow the project's one confinement rule (lens_core.paths): an image that is
    a symlink to a file outside its folder is skipped with the fix named (it was followed before), while a
    data root that is itself a symlink, and a link between two files inside the root, still work."""
    from PIL import Image

    data = tmp_path / "data"
    _write_one_image_refer(data, {"id": 1, "file_name": "a.jpg", "height": 10, "width": 10},
                           segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]])
    images = data / "refer_seg/images/mscoco/images/train2014"
    Image.new("RGB", (10, 10)).save(tmp_path / "outside.jpg")
    (images / "a.jpg").symlink_to(tmp_path / "outside.jpg")
    table = build_manifest("refcoco:val", data)
    assert table.num_rows == 0
    (skipped,) = get_skipped(table)
    assert skipped["path"].endswith("instances.json#image:1") and "\n" not in skipped["reason"]
    assert skipped["reason"] == (
        f"file name 'a.jpg' is not a path inside {images}: it leads to {tmp_path / 'outside.jpg'} through a symlink, "
        f"outside its folder; copy the file into {images} instead of linking to it")

    (images / "a.jpg").unlink()
    Image.new("RGB", (10, 10)).save(images / "b.jpg")
    (images / "a.jpg").symlink_to(images / "b.jpg")  # a link inside the folder: followed
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(data, target_is_directory=True)  # the data root itself is a link
    table = build_manifest("refcoco:val", linked_root)
    rows = table.to_pylist()
    assert get_skipped(table) == [] and len(rows) == 1
    assert rows[0]["image_path"] == str(linked_root / "refer_seg/images/mscoco/images/train2014/a.jpg")  # not resolved


def test_a_truncated_refs_pickle_is_one_line_exit_2(tmp_path: Path) -> None:
    """Issue 11: a truncated refs(unc).p printed 'Aborted.' and exited 1 (click took the EOFError for Ctrl-D)."""
    from lens_cache.cli import app
    from typer.testing import CliRunner

    root = _write_refer(tmp_path)
    refs = root / "refer_seg" / "refcoco" / "refs(unc).p"
    refs.write_bytes(refs.read_bytes()[:40])
    result = CliRunner().invoke(app, ["manifest", "--split", "refcoco:val", "--data-root", str(root),
                                      "-o", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {refs} is not a complete pickle (truncated or damaged: ")
    assert line.endswith("): download refs(unc).p again")
    assert not (tmp_path / "m.parquet").exists()
