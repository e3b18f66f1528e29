"""The synthetic set: deterministic, written in the real formats, read by the real adapters."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lens_manifests import (
    ManifestError,
    build_manifest,
    decode_target,
    default_synthetic_dir,
    manifest_hash,
    write_synthetic,
)
from lens_manifests.reasonseg import load_reasonseg
from lens_manifests.refer import load_refer
from lens_manifests.semantic import load_ade20k
from lens_manifests.synthetic import COLOURS, MARKER, SYNTHETIC_CLASSES

SMALL = {"num_train_images": 8, "num_val_images": 4, "num_test_images": 4}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "seed0"
    write_synthetic(out, seed=0, **SMALL)
    return out


def test_marker_and_idempotence(synth: Path) -> None:
    marker = json.loads((synth / MARKER).read_text())
    assert marker["params"]["seed"] == 0 and marker["params"]["num_train_images"] == 8
    assert marker["counts"]["refer"]["testA"]["images"] + marker["counts"]["refer"]["testB"]["images"] == 4
    before = (synth / MARKER).stat().st_mtime_ns
    assert write_synthetic(synth, seed=0, **SMALL)["params"] == marker["params"]
    assert (synth / MARKER).stat().st_mtime_ns == before  # nothing rewritten
    assert not [p for p in synth.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def _relocated_hash(table: pa.Table, root: Path) -> str:
    """Hash with image paths made relative to ``root`` (the folders differ, the data must not)."""
    rel = pa.array([str(Path(p).relative_to(root)) for p in table.column("image_path").to_pylist()])
    return manifest_hash(table.set_column(table.schema.get_field_index("image_path"), "image_path", rel))


def test_same_seed_same_manifest_other_seed_differs(synth: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_synthetic(again, seed=0, workers=1, **SMALL)  # other process count: same bytes
    other = tmp_path / "other"
    write_synthetic(other, seed=1, **SMALL)
    for spec in ("synthetic:train", "synthetic:val", "synthetic:test"):
        h = _relocated_hash(build_manifest(spec, synth), synth)
        assert h == _relocated_hash(build_manifest(spec, again), again)
        assert h != _relocated_hash(build_manifest(spec, other), other)
    val = build_manifest("synthetic:val", synth)
    assert manifest_hash(val) == manifest_hash(build_manifest("synthetic:val", synth))
    a = np.asarray(Image.open(next((synth / "reason_seg/ReasonSeg/val").glob("*.jpg"))))
    b = np.asarray(Image.open(next((again / "reason_seg/ReasonSeg/val").glob("*.jpg"))))
    np.testing.assert_array_equal(a, b)
    refs = "refer_seg/synthref/refs(unc).p"
    assert (synth / refs).read_bytes() == (again / refs).read_bytes()


def test_real_adapters_read_it(synth: Path) -> None:
    reason = load_reasonseg(synth, "val", dataset="synthetic_reason").to_pylist()
    assert len(reason) == 4 and all(r["task"] == "reasoning" for r in reason)
    refer = load_refer(
        synth, "synthref", "testA", split_by="unc", image_dir=synth / "refer_seg/images/synthref"
    ).to_pylist()
    assert refer and all(r["split"] == "testA" and r["task"] == "referring" for r in refer)
    classes = json.loads((synth / "ade20k/synthetic_classes.json").read_text())
    assert tuple(classes) == SYNTHETIC_CLASSES
    sem = load_ade20k(synth, "train", class_names=classes).to_pylist()
    assert sem and {r["text"] for r in sem} <= set(SYNTHETIC_CLASSES)
    refs = pickle.loads((synth / "refer_seg/synthref/refs(unc).p").read_bytes())
    assert {"ref_id", "ann_id", "image_id", "split", "sentences"} <= set(refs[0])


def test_targets_are_exactly_the_drawn_shapes(synth: Path) -> None:
    # Inside every target, pixels carry a shape colour (palette +-12, texture and JPEG noise);
    # the rim just outside carries background. Painting went through the decoded mask itself.
    palette = np.array(list(COLOURS.values()), dtype=int)
    for spec in ("synthetic-reason:train", "synthetic-refer:train", "synthetic-sem:train"):
        table = build_manifest(spec, synth)
        for i in range(0, table.num_rows, max(1, table.num_rows // 6)):
            row = table.slice(i, 1).to_pylist()[0]
            image = np.asarray(Image.open(row["image_path"]).convert("RGB")).astype(int)
            target = decode_target(table, i)
            assert image.shape[:2] == target.shape == (row["height"], row["width"])
            if row["text"] == "background" or not (target == 1).any():
                continue
            inner = target == 1
            for _ in range(2):  # JPEG's chroma subsampling blurs a couple of pixels at the border
                inner = inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0)
                inner = inner & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
            dist = np.abs(image[inner][:, None, :] - palette[None]).max(axis=2).min(axis=1)
            assert np.percentile(dist, 95) < 40, spec


def test_masks_are_unions_of_the_painted_shapes(synth: Path) -> None:
    # Regenerate the scenes (pure functions of the seed): every shape's pixel mask, the mask the
    # image was painted through, lies wholly inside or wholly outside the decoded target.
    from lens_manifests.synthetic import _item_rng, make_scene

    table = build_manifest("synthetic-reason:val", synth)
    for i in range(table.num_rows):
        scene = make_scene(_item_rng(0, "reason", "val", i), rule="cv2")
        target = decode_target(table, i)
        covered = np.zeros(target.shape, dtype=bool)
        for shape in scene.shapes:
            inside = target[shape.mask]
            assert (inside == inside[0]).all()
            covered |= shape.mask
        assert not (target[~covered] != 0).any()  # nothing outside the shapes


def test_union_spec_and_query_counts(synth: Path) -> None:
    train = build_manifest("synthetic:train", synth)
    assert set(train.column("dataset").to_pylist()) == {"synthetic_sem", "synthetic_refer", "synthetic_reason"}
    assert train.column("query_id").to_pylist() == list(range(train.num_rows))
    test = build_manifest("synthetic:test", synth)
    assert {"testA", "testB"} <= set(test.column("split").to_pylist())
    reason = build_manifest("synthetic-reason:train", synth).to_pylist()
    assert any(r["is_sentence"] for r in reason)
    assert build_manifest("synthetic-refer:test", synth).num_rows == sum(
        build_manifest(f"synthetic-refer:{s}", synth).num_rows for s in ("testA", "testB")
    )


def test_default_folder_and_foreign_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_DATA_DIR", str(tmp_path / "data"))
    default = tmp_path / "data" / "synthetic" / "seed-5"
    assert default_synthetic_dir(5) == default
    write_synthetic(default, seed=5, **SMALL)  # a finished set of this seed is used as it is
    stamp = (default / MARKER).stat().st_mtime_ns
    table = build_manifest("synthetic-sem:val", None, seed=5)
    assert table.num_rows > 0 and (default / MARKER).stat().st_mtime_ns == stamp
    assert table.column("image_path")[0].as_py().startswith(str(default.resolve()))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="holds no synthetic data"):
        build_manifest("synthetic:val", foreign)
    with pytest.raises(ManifestError, match=r"not empty and has no SYNTHETIC_DONE\.json"):
        write_synthetic(foreign, seed=0, **SMALL)
