"""ReasonSeg adapter on tiny fixtures written in LISA's format (jpg + LabelMe-style json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lens_manifests import ManifestError, build_manifest, decode_target, get_skipped
from lens_manifests.reasonseg import label_map_from_shapes, load_reasonseg


def _write_item(split_dir: Path, name: str, size: tuple[int, int], anno: dict[str, Any], exif_rotate: bool = False):
    split_dir.mkdir(parents=True, exist_ok=True)
    h, w = size
    img = Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8))
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90: displayed size is (w, h)
        img.save(split_dir / f"{name}.jpg", quality=95, exif=exif)
    else:
        img.save(split_dir / f"{name}.jpg", quality=95)
    (split_dir / f"{name}.json").write_text(json.dumps(anno))


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


@pytest.fixture()
def reason_root(tmp_path: Path) -> Path:
    base = tmp_path / "reason_seg" / "ReasonSeg"
    for split in ("train", "val"):
        _write_item(
            base / split,
            "a_img",
            (20, 30),
            {
                "text": ["what can hold water?", "the cup", "something to drink from"],
                "is_sentence": True,
                "shapes": [
                    {"label": "target", "points": _rect(2, 3, 10, 8)},  # 9 x 6 = 54 px
                    {"label": "flag", "points": _rect(0, 0, 29, 19)},  # must be skipped
                ],
            },
        )
        _write_item(
            base / split,
            "b_img",
            (20, 30),
            {
                "text": ["the dog"],
                "is_sentence": False,
                "shapes": [
                    # drawn in file order small-then-large: the larger ignore region must be filled
                    # first so that the small target inside it stays target
                    {"label": "target", "points": _rect(5, 5, 7, 7)},  # 3 x 3 = 9 px
                    {"label": "ignore", "points": _rect(2, 2, 12, 12)},  # 11 x 11 = 121 px
                    {"label": "Ignore_region", "points": _rect(20, 2, 22, 3)},  # 3 x 2 = 6 px
                ],
            },
        )
    return tmp_path


def test_masks_ignore_flag_and_fill_order(reason_root: Path) -> None:
    table = load_reasonseg(reason_root, "val")
    assert table.num_rows == 2
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["a_img", "b_img"]
    a = decode_target(rows[0])
    assert a.shape == (20, 30)
    assert (a == 1).sum() == 54 and (a == 255).sum() == 0  # "flag" contributed nothing
    assert rows[0]["ignore_rle"] is None
    b = decode_target(rows[1])
    assert (b == 1).sum() == 9  # small target survives inside the larger ignore
    assert (b == 255).sum() == 121 - 9 + 6
    assert b[6, 6] == 1 and b[3, 3] == 255 and b[2, 21] == 255


def test_eval_split_uses_first_text_train_uses_all(reason_root: Path) -> None:
    val = load_reasonseg(reason_root, "val").to_pylist()
    assert [r["text"] for r in val] == ["what can hold water?", "the dog"]
    assert [r["is_sentence"] for r in val] == [True, False]
    train = load_reasonseg(reason_root, "train").to_pylist()
    assert [r["text"] for r in train] == ["what can hold water?", "the cup", "something to drink from", "the dog"]
    assert [r["query_id"] for r in train] == [0, 1, 2, 3]
    assert [r["source_id"] for r in train][:2] == ["a_img/text:0", "a_img/text:1"]
    assert all(r["task"] == "reasoning" and r["dataset"] == "reasonseg" and r["split"] == "train" for r in train)
    assert all(Path(r["image_path"]).is_absolute() for r in train)


def test_lisa_area_order_matches_hand_rule() -> None:
    # an ignore polygon listed after a larger target: drawn later, it wins where they overlap
    shapes = [{"label": "target", "points": _rect(0, 0, 9, 9)}, {"label": "ignore", "points": _rect(2, 2, 4, 4)}]
    m = label_map_from_shapes(shapes, 10, 10)
    assert (m == 255).sum() == 9 and (m == 1).sum() == 100 - 9


def test_broken_items_are_skipped_and_reported(reason_root: Path) -> None:
    split_dir = reason_root / "reason_seg" / "ReasonSeg" / "val"
    (split_dir / "c_broken.jpg").write_bytes(b"not a jpeg")
    (split_dir / "c_broken.json").write_text(json.dumps({"text": ["x"], "is_sentence": False, "shapes": []}))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(split_dir / "d_nojson.jpg")
    table = load_reasonseg(reason_root, "val")
    assert table.num_rows == 2
    skipped = {Path(s["path"]).name: s["reason"] for s in get_skipped(table)}
    assert set(skipped) == {"c_broken.jpg", "d_nojson.jpg"}
    assert "unreadable image header" in skipped["c_broken.jpg"]


def test_exif_orientation_swaps_size(tmp_path: Path) -> None:
    split_dir = tmp_path / "reason_seg" / "ReasonSeg" / "test"
    _write_item(split_dir, "r", (10, 16), {"text": ["t"], "is_sentence": False, "shapes": []}, exif_rotate=True)
    row = load_reasonseg(tmp_path, "test").to_pylist()[0]
    assert (row["height"], row["width"]) == (16, 10)


def test_cp1252_json_is_read(tmp_path: Path) -> None:
    split_dir = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    split_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(split_dir / "e.jpg")
    anno = '{"text": ["caf\u00e9 table"], "is_sentence": false, "shapes": []}'
    (split_dir / "e.json").write_bytes(anno.encode("cp1252"))
    assert load_reasonseg(tmp_path, "val").column("text").to_pylist() == ["caf\u00e9 table"]


def test_registry_and_errors(reason_root: Path, tmp_path: Path) -> None:
    assert build_manifest("reasonseg:val", reason_root).num_rows == 2
    assert build_manifest("reasonseg", reason_root).column("split").to_pylist()[0] == "train"
    with pytest.raises(ManifestError, match=r"reason_seg/ReasonSeg/test.*point --data-root at LISA's dataset folder"):
        build_manifest("reasonseg:test", reason_root)
    with pytest.raises(ManifestError, match="unknown split 'dev' for reasonseg"):
        build_manifest("reasonseg:dev", reason_root)


def test_nan_points_and_oversized_images_are_skipped_the_rest_goes_on(reason_root: Path, monkeypatch) -> None:
    """Issue 11: a NaN polygon point was cast to -2**31 and drew a line across the mask; now that image
    is skipped with the reason, and an image above LENS_MAX_IMAGE_SIDE is skipped before any raster."""
    split_dir = reason_root / "reason_seg" / "ReasonSeg" / "val"
    nan_shape = {"label": "target", "points": [[1, 1], [float("nan"), 5], [9, 9]]}
    _write_item(split_dir, "c_nan", (20, 30), {"text": ["x"], "is_sentence": False, "shapes": [nan_shape]})
    _write_item(split_dir, "d_wide", (20, 40), {"text": ["y"], "is_sentence": False, "shapes": []})
    monkeypatch.setenv("LENS_MAX_IMAGE_SIDE", "32")
    table = load_reasonseg(reason_root, "val")
    assert table.column("image_id").to_pylist() == ["a_img", "b_img"]
    skipped = {Path(s["path"]).name: s["reason"] for s in get_skipped(table)}
    assert skipped == {
        "c_nan.json": "unusable shapes (polygon has coordinates that are NaN or infinite)",
        "d_wide.jpg": "image size 20x40 exceeds the limit of 32 px per side (set LENS_MAX_IMAGE_SIDE to change it)",
    }


def test_a_file_name_that_is_not_utf8_is_skipped_and_listed(tmp_path: Path) -> None:
    """Issue 24 row 5: one image whose name is not valid UTF-8 is skipped and listed; the rest is cached."""
    import os

    split_dir = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    anno = {"text": ["t"], "is_sentence": False, "shapes": [{"label": "target", "points": _rect(1, 1, 5, 5)}]}
    _write_item(split_dir, "good", (10, 16), anno)
    _write_item(split_dir, "bad", (10, 16), anno)
    for suffix in (b".jpg", b".json"):  # rename to a name with a Latin-1 byte (not UTF-8)
        os.rename(os.fsencode(split_dir / "bad") + suffix, os.fsencode(split_dir) + b"/caf\xe9" + suffix)
    table = load_reasonseg(tmp_path, "val")
    assert [Path(p).name for p in table.column("image_path").to_pylist()] == ["good.jpg"]
    skipped = get_skipped(table)
    assert len(skipped) == 1 and skipped[0]["path"].endswith("caf\\xe9.jpg") and "not valid UTF-8" in skipped[0]["reason"]
