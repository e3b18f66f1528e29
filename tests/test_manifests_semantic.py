"""Semantic-segmentation adapters on tiny fixtures in LISA's dataset_dir layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_manifests import ManifestError, build_manifest, decode_target, manifest_hash
from lens_manifests.classes import ADE20K_CLASSES, COCOSTUFF_CLASSES
from lens_manifests.semantic import load_ade20k


def _jpg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8))
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def _ade_fixture(root: Path) -> None:
    a = np.zeros((6, 8), np.uint8)  # ADE value 0 = unlabelled -> ignore
    a[:, 2:4] = 1  # wall
    a[:, 4:6] = 3  # sky
    a[0, :] = 13  # person
    a[5, :] = 151  # beyond the 150 classes -> ignore
    _png(root / "ade20k/annotations/training/ADE_train_00000001.png", a)
    _jpg(root / "ade20k/images/training/ADE_train_00000001.jpg", 6, 8)
    b = np.full((4, 4), 5, np.uint8)  # all "tree"
    _png(root / "ade20k/annotations/training/ADE_train_00000002.png", b)
    _jpg(root / "ade20k/images/training/ADE_train_00000002.jpg", 4, 4)
    c = np.zeros((4, 4), np.uint8)
    c[0, 0], c[0, 1], c[1, 0], c[1, 1] = 1, 2, 3, 4  # four classes -> three sampled
    _png(root / "ade20k/annotations/training/ADE_train_00000003.png", c)
    _jpg(root / "ade20k/images/training/ADE_train_00000003.jpg", 4, 4)
    _jpg(root / "ade20k/images/training/ADE_train_00000004.jpg", 4, 4)  # no annotation: skipped
    v = np.full((3, 3), 2, np.uint8)
    _png(root / "ade20k/annotations/validation/ADE_val_00000001.png", v)
    _jpg(root / "ade20k/images/validation/ADE_val_00000001.jpg", 3, 3)


def test_ade20k_labels_ignore_and_sampling(tmp_path: Path) -> None:
    _ade_fixture(tmp_path)
    table = load_ade20k(tmp_path, "train", seed=0)
    rows = table.to_pylist()
    first = [r for r in rows if r["image_id"] == "ADE_train_00000001"]
    assert [r["text"] for r in first] == ["wall", "sky", "person"]  # class-index order
    assert [r["source_id"] for r in first] == ["0:wall", "2:sky", "12:person"]
    wall = decode_target(first[0])
    assert (wall == 1).sum() == 2 * 4 and wall[1:5, 2:4].all()  # rows 1-4, columns 2-3
    # ignore: value 0 (columns 0,1,6,7 of rows 1-4) and value 151 (row 5)
    assert (wall == 255).sum() == 4 * 4 + 8
    assert {r["task"] for r in rows} == {"semantic"} and not any(r["is_sentence"] for r in rows)
    assert [r["text"] for r in rows if r["image_id"] == "ADE_train_00000002"] == ["tree"]
    third = [r["text"] for r in rows if r["image_id"] == "ADE_train_00000003"]
    assert len(third) == 3 and set(third) <= {"wall", "building", "sky", "floor"}
    assert [r["query_id"] for r in rows] == list(range(len(rows)))
    assert (first[0]["height"], first[0]["width"]) == (6, 8)
    skipped = json.loads(table.schema.metadata[b"lens_skipped"])
    assert [Path(s["path"]).name for s in skipped] == ["ADE_train_00000004.jpg"]


def test_ade20k_sampling_is_seeded(tmp_path: Path) -> None:
    _ade_fixture(tmp_path)
    picks = set()
    for seed in range(12):
        t1, t2 = load_ade20k(tmp_path, "train", seed=seed), load_ade20k(tmp_path, "train", seed=seed)
        assert manifest_hash(t1) == manifest_hash(t2)
        picks.add(tuple(r["text"] for r in t1.to_pylist() if r["image_id"] == "ADE_train_00000003"))
    assert len(picks) > 1  # the seed does change which three of the four classes are drawn


def test_ade20k_val_class_override_and_registry(tmp_path: Path) -> None:
    _ade_fixture(tmp_path)
    assert build_manifest("ade20k:val", tmp_path).column("text").to_pylist() == [ADE20K_CLASSES[1]]
    custom = load_ade20k(tmp_path, "val", class_names=["bg", "disc"], dataset="mine")
    assert custom.column("text").to_pylist() == ["disc"] and custom.column("dataset")[0].as_py() == "mine"
    with pytest.raises(ManifestError, match="unknown split 'test' for ade20k"):
        build_manifest("ade20k:test", tmp_path)
    with pytest.raises(ManifestError, match="point --data-root"):
        build_manifest("ade20k", tmp_path / "nowhere")


def test_cocostuff_ignores_dashed_classes(tmp_path: Path) -> None:
    lab = np.full((5, 5), 255, np.uint8)
    lab[0, :] = 0  # person
    lab[1, :] = COCOSTUFF_CLASSES.index("wall-brick")  # has a "-": ignored, as LISA does
    lab[2, :] = COCOSTUFF_CLASSES.index("grass")
    _png(tmp_path / "cocostuff/train2017/000000000009.png", lab)
    _jpg(tmp_path / "coco/train2017/000000000009.jpg", 5, 5)
    rows = build_manifest("cocostuff", tmp_path).to_pylist()
    assert [r["text"] for r in rows] == ["person", "grass"]
    assert rows[0]["image_path"].endswith("coco/train2017/000000000009.jpg")
    t = decode_target(rows[0])
    assert (t == 1).sum() == 5 and (t == 255).sum() == 15


def test_mapillary_palette_labels(tmp_path: Path) -> None:
    labels = [{"readable": "Bird", "name": "animal--bird"}, {"readable": "Road", "name": "construction--flat--road"},
              {"readable": "Unlabeled", "name": "void--unlabeled"}]  # fmt: skip
    (tmp_path / "mapillary").mkdir()
    (tmp_path / "mapillary/config_v2.0.json").write_text(json.dumps({"labels": labels}))
    lab = np.full((4, 6), 2, np.uint8)
    lab[:2, :3] = 1
    _png(tmp_path / "mapillary/training/v2.0/labels/abc.png", lab, palette=True)
    _jpg(tmp_path / "mapillary/training/images/abc.jpg", 4, 6)
    rows = build_manifest("mapillary:train", tmp_path).to_pylist()
    assert [r["text"] for r in rows] == ["road"]  # "unlabeled" is ignore, not a query
    t = decode_target(rows[0])
    assert (t == 1).sum() == 6 and (t == 255).sum() == 18


def _coco_parts(path: Path, categories: list[dict], file_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    square = [[1.0, 1.0, 4.0, 1.0, 4.0, 4.0, 1.0, 4.0]]
    other = [[5.0, 5.0, 8.0, 5.0, 8.0, 8.0, 5.0, 8.0]]
    anns = [
        {"id": 1, "image_id": 3, "category_id": categories[0]["id"], "segmentation": square},
        {"id": 2, "image_id": 3, "category_id": categories[0]["id"], "segmentation": other},
        {"id": 3, "image_id": 3, "category_id": categories[1]["id"], "segmentation": other},
    ]
    images = [{"id": 3, "file_name": file_name, "height": 10, "width": 10}, {"id": 4, "file_name": "x.jpg",
              "height": 10, "width": 10}]  # fmt: skip
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))


def test_paco_lvis_names_and_instance_union(tmp_path: Path) -> None:
    cats = [{"id": 7, "name": "trash_can:body"}, {"id": 9, "name": "bow_(weapon)"}]
    _coco_parts(tmp_path / "vlpart/paco/annotations/paco_lvis_v1_train.json", cats, "train2017/000000000003.jpg")
    (tmp_path / "coco").mkdir()
    rows = build_manifest("paco_lvis", tmp_path, seed=0).to_pylist()
    assert len(rows) == 2  # image 4 has no annotation
    assert rows[0]["text"] in ("trash_can body", "the body of the trash_can") and rows[1]["text"] == "bow"
    assert rows[0]["image_path"].endswith("coco/train2017/000000000003.jpg")
    assert (decode_target(rows[0]) == 1).sum() == 2 * (decode_target(rows[1]) == 1).sum()  # both instances
    texts = {build_manifest("paco_lvis", tmp_path, seed=s).column("text")[0].as_py() for s in range(10)}
    assert texts == {"trash_can body", "the body of the trash_can"}


def test_pascal_part(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "dog:head"}, {"id": 2, "name": "cat:leg"}]
    _coco_parts(tmp_path / "vlpart/pascal_part/val.json", cats, "2008_000003.jpg")
    (tmp_path / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages").mkdir(parents=True)
    rows = build_manifest("pascal_part:val", tmp_path).to_pylist()
    assert [r["source_id"] for r in rows] == ["category:1", "category:2"]
    assert rows[1]["text"] in ("cat leg", "the leg of the cat")
    assert rows[0]["image_path"].endswith("vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000003.jpg")
    with pytest.raises(ManifestError, match=r"pascal_part/train\.json not found"):
        build_manifest("pascal_part", tmp_path)


@pytest.mark.parametrize("file_name", ["../../etc/passwd", "/etc/passwd"])
def test_a_part_set_file_name_outside_the_image_folder_is_skipped(tmp_path: Path, file_name: str) -> None:
    """Issue 11: paths from dataset files must stay inside the image folder (never read otherwise)."""
    from lens_manifests import get_skipped

    cats = [{"id": 1, "name": "dog:head"}, {"id": 2, "name": "cat:leg"}]
    _coco_parts(tmp_path / "vlpart/pascal_part/val.json", cats, file_name)
    (tmp_path / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages").mkdir(parents=True)
    table = build_manifest("pascal_part:val", tmp_path)
    assert table.num_rows == 0
    assert [s["reason"].split(" is not a path inside ")[0] for s in get_skipped(table)] == [f"file name {file_name!r}"]


def test_a_part_set_image_linked_from_outside_the_data_root_is_skipped_a_linked_root_works(tmp_path: Path) -> None:
    """Issue 22: an image that is a symlink to a file outside its folder is skipped with the fix named
    (lens_core.paths, the project's one rule); the same data reached through a data root that is a link works."""
    from lens_manifests import get_skipped

    data = tmp_path / "data"
    cats = [{"id": 1, "name": "dog:head"}, {"id": 2, "name": "cat:leg"}]
    _coco_parts(data / "vlpart/pascal_part/val.json", cats, "2008_000003.jpg")
    images = data / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"
    _jpg(tmp_path / "elsewhere/2008_000003.jpg", 10, 10)
    images.mkdir(parents=True)
    (images / "2008_000003.jpg").symlink_to(tmp_path / "elsewhere/2008_000003.jpg")
    table = build_manifest("pascal_part:val", data)
    assert table.num_rows == 0
    (skipped,) = get_skipped(table)
    assert skipped["path"].endswith("val.json#image:3")
    assert "through a symlink" in skipped["reason"] and "\n" not in skipped["reason"]
    assert skipped["reason"].endswith(f"copy the file into {images} instead of linking to it")

    (images / "2008_000003.jpg").unlink()
    _jpg(images / "2008_000003.jpg", 10, 10)
    (tmp_path / "root-link").symlink_to(data, target_is_directory=True)
    rows = build_manifest("pascal_part:val", tmp_path / "root-link").to_pylist()
    assert [r["source_id"] for r in rows] == ["category:1", "category:2"]
    assert rows[0]["image_path"] == str(tmp_path / "root-link/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000003.jpg")
