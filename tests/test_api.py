"""The Python API (``from lens_train import Segmenter``) and ``lens-segment --jsonl``.

Uses the session fixture ``tiny_real_run`` (conftest): a cache built with the REAL tiny LLaVA and tiny
SAM, and a run trained 2 steps on it; ``segmenter`` is attached to the extractor that built the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lens_train.errors import UserError
from lens_train.inference.segment import app


def test_import_lens_train_stays_light_and_exports_segmenter():
    code = ("import sys, lens_train; assert 'torch' not in sys.modules, 'torch imported'; "
            "from lens_train import Segmenter; from lens_train.inference.segmenter import Segmenter as S; "
            "assert Segmenter is S; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_from_pretrained_and_call(tiny_real_run):
    from lens_train import Segmenter

    seg = Segmenter.from_pretrained(tiny_real_run.run_dir, extractor=tiny_real_run.extractor, device="cpu")
    text, _ = tiny_real_run.query(0)
    image = Image.open(tiny_real_run.image_path(0))
    result = seg(tiny_real_run.image_path(0), text)
    assert result.mask.shape == (image.height, image.width) and result.mask.dtype == bool
    assert isinstance(result.score, float) and result.score == result.iou_prediction
    assert result.heatmap.shape == (24, 24) and result.keypoints.shape[1] == 2
    overlay = result.overlay()
    assert isinstance(overlay, Image.Image) and overlay.size == image.size
    again = seg.segment(image, text)
    assert torch.equal(again.logits, result.logits)


def _items(tiny_real_run):
    """3 instructions on each of the 2 images, interleaved, one repeated, one a phrase; paths written two ways."""
    a, b = tiny_real_run.image_path(0), tiny_real_run.image_path(1)
    (ta, sa), (tb, sb) = tiny_real_run.query(0), tiny_real_run.query(1)
    b_other = str(b).replace("/", "//", 1)  # the same file, another spelling
    return [(a, ta, sa), (b, tb, sb), (a, "the biggest shape", True), (b_other, "circle", False), (a, ta, sa),
            {"image": b, "instruction": "what is on the left?"}]


def test_batch_shares_each_images_prefix_and_equals_one_by_one(tiny_real_run, segmenter, monkeypatch):
    calls = []
    extract = segmenter.extractor.extract

    def counting(images, questions):
        calls.append([len(q) for q in questions])
        return extract(images, questions)

    monkeypatch.setattr(segmenter.extractor, "extract", counting)
    items = _items(tiny_real_run)
    progress = []
    results = segmenter.batch(items, batch_size=8, progress=lambda done, total: progress.append((done, total)))
    # one backbone forward: 2 images (each image's prefix and SAM embedding once), 2 distinct questions on
    # the first (one instruction asked twice), 3 on the second
    assert calls == [[2, 3]] and progress == [(6, 6)]
    calls.clear()
    for item, result in zip(items, results):
        image, text, is_sentence = (item["image"], item["instruction"], True) if isinstance(item, dict) else item
        single = segmenter.segment(image, text, is_sentence=is_sentence)
        assert result.instruction == text and result.question == single.question
        torch.testing.assert_close(result.logits, single.logits, rtol=0, atol=1e-4)
        clear = np.abs(single.probability - single.threshold) > 1e-3  # away from the threshold, the same mask
        assert np.array_equal(result.mask[clear], single.mask[clear])
        assert result.score == pytest.approx(single.score, abs=1e-4)
    assert calls == [[1]] * len(items)
    # batch_size counts images: one forward per image
    calls.clear()
    segmenter.batch(items, batch_size=1)
    assert calls == [[2], [3]]


def test_batch_checks_every_item_before_running(tiny_real_run, segmenter, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(segmenter.extractor, "extract", lambda *a: calls.append(a) or 1 / 0)
    a = tiny_real_run.image_path(0)
    with pytest.raises(UserError, match=r"^item 1: the instruction is empty"):
        segmenter.batch([(a, "the cat"), (a, "  ")])
    with pytest.raises(UserError, match=r"^item 0: no image"):
        segmenter.batch([{"instruction": "the cat"}])
    with pytest.raises(UserError, match=r"^item 1: image not found"):
        segmenter.batch([(a, "the cat"), (tmp_path / "nope.png", "the dog")], batch_size=1)
    assert not calls
    assert segmenter.batch([]) == []


def _write_jobs(tiny_real_run, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"not an image at all" * 4)
    (tmp_path / "img0.png").write_bytes(open(tiny_real_run.image_path(0), "rb").read())
    lines = [
        json.dumps({"image": "img0.png", "instruction": "the biggest shape"}),  # relative to the file's folder
        json.dumps({"image": tiny_real_run.image_path(1), "instruction": "circle", "phrase": True}),
        "{not json",
        "",
        json.dumps({"instruction": "no image here"}),
        json.dumps({"image": "img0.png", "instruction": "   "}),
        json.dumps({"image": str(not_image), "instruction": "the cat"}),
        json.dumps({"image": str(tmp_path / "missing.png"), "instruction": "the cat"}),
        json.dumps({"image": tiny_real_run.image_path(0), "instruction": "what is at the top?"}),
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_cli_segments_the_good_lines_and_reports_the_bad(tiny_real_run, segmenter, tmp_path):
    jobs = _write_jobs(tiny_real_run, tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["--jsonl", str(jobs), "--checkpoint", str(tiny_real_run.run_dir), "-o", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    bad = [line for line in err if line.startswith("line ")]
    assert [line.split(":")[0] for line in bad] == ["line 3", "line 5", "line 6", "line 7", "line 8"]
    assert "not JSON" in bad[0] and "no \"image\"" in bad[1] and "instruction is empty" in bad[2]
    assert "cannot read image" in bad[3] and "image not found" in bad[4]
    assert any("items/s" in line and "ETA" in line for line in err)
    assert err[-1] == f"error: 5 line(s) of {jobs} skipped (listed above); the other 3 were segmented into {out}"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5, 6, 7, 8, 9]
    good = [r for r in records if "error" not in r]
    assert [r["mask"] for r in good] == ["masks/000001.png", "masks/000002.png", "masks/000009.png"]
    expected = segmenter.batch([(tmp_path / "img0.png", "the biggest shape"), (tiny_real_run.image_path(1), "circle", False),
                                (tiny_real_run.image_path(0), "what is at the top?")])
    for record, want in zip(good, expected):
        mask = np.asarray(Image.open(out / record["mask"])) == 255
        assert np.array_equal(mask, want.mask) and record["mask_pixels"] == int(want.mask.sum())
    assert good[1]["phrase"] is True and good[1]["question"] == expected[1].question


def test_jsonl_cli_exits_0_when_every_line_is_good_and_refuses_mixed_arguments(tiny_real_run, tmp_path):
    jobs = tmp_path / "ok.jsonl"
    jobs.write_text(json.dumps({"image": tiny_real_run.image_path(0), "instruction": "the shape"}) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["--jsonl", str(jobs), "--checkpoint", str(tiny_real_run.run_dir), "-o", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "masks" / "000001.png").is_file() and len((out / "results.jsonl").read_text().splitlines()) == 1
    both = CliRunner().invoke(app, [tiny_real_run.image_path(0), "x", "--jsonl", str(jobs), "--checkpoint", "toy",
                                    "-o", str(out)])
    assert both.exit_code == 2 and both.stderr.strip() == "error: give IMAGE INSTRUCTION or --jsonl FILE, not both"
    neither = CliRunner().invoke(app, ["--checkpoint", "toy", "-o", str(out)])
    assert neither.exit_code == 2 and neither.stderr.strip() == "error: give IMAGE and INSTRUCTION (or --jsonl FILE)"


def _toy_head_shipped() -> bool:
    from lens_cache.backbones.toy import WEIGHTS_DIR

    return (WEIGHTS_DIR / "lens_head" / "config.json").is_file()


@pytest.mark.skipif(not _toy_head_shipped(), reason="no shipped toy LENS head")
def test_the_toy_head_runs_from_python_and_the_cli(tmp_path):
    from lens_manifests import build_manifest

    from lens_train import Segmenter
    from lens_train.testing import small_synthetic

    rows = build_manifest("synthetic:val", small_synthetic(tmp_path / "synthetic", images=2)).to_pylist()
    row = next(r for r in rows if r["task"] == "referring")
    seg = Segmenter.from_pretrained("toy", device="cpu")
    assert seg.trained.kind == "model" and seg.extractor.identity["name_or_path"] == "toy"
    result = seg(row["image_path"], row["text"], is_sentence=row["is_sentence"])
    assert result.mask.shape == (row["height"], row["width"]) and 0 < result.mask.sum() < result.mask.size
    out = tmp_path / "out"
    args = [row["image_path"], row["text"], "--checkpoint", "toy", "-o", str(out), "--device", "cpu",
            *([] if row["is_sentence"] else ["--phrase"])]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert np.array_equal(np.asarray(Image.open(out / "mask.png")) == 255, result.mask)
