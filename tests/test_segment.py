"""lens-segment: live inference (MLLM + SAM encoder run on the image) equals the cached path.

Uses the session fixture ``tiny_real_run`` (conftest): a cache built with the REAL tiny
LLaVA and tiny SAM, and a run trained 2 steps on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lens_train.errors import UserError
from lens_train.inference.result import overlay_image
from lens_train.inference.segment import app
from lens_train.inference.segmenter import check_backbone, segment_image


def _cached(tiny_real_run, item: int):
    from lens_train.training.data import QueryDataset, collate
    from lens_train.evaluation.evaluate import predict
    from lens_train.training.loading import load_run

    dataset = QueryDataset(tiny_real_run.store_url, 14)
    run = load_run(tiny_real_run.run_dir)
    batch = collate([dataset[item]])
    _, logits = predict(run.model, batch.to("cpu"), precision=run.precision)
    return int(dataset.query_ids[item]), batch, logits[0], run.threshold


@pytest.mark.parametrize("item", [0, 1])
def test_live_segmentation_equals_cached_path(tiny_real_run, segmenter, item):
    query_id, cached_batch, cached_logits, threshold = _cached(tiny_real_run, item)
    text, is_sentence = tiny_real_run.query(query_id)
    image = Image.open(tiny_real_run.image_path(query_id))

    # The live float16 features are the stored ones, bit for bit ...
    question = segmenter.extractor.question_for(text, is_sentence)
    live = segmenter.features(image.convert("RGB"), question)
    for name in ("image_states", "text_states", "sam_embeddings", "text_lengths", "input_sizes", "original_sizes"):
        assert torch.equal(getattr(live, name), getattr(cached_batch, name)), name

    # ... so the mask logits and the mask are the cached path's.
    result = segmenter.segment(image, text, is_sentence=is_sentence)
    torch.testing.assert_close(result.logits, cached_logits.float().cpu(), rtol=0, atol=1e-6)
    assert np.array_equal(result.mask, (torch.sigmoid(cached_logits) > threshold).numpy())
    assert result.mask.shape == (image.height, image.width) and result.mask.dtype == bool
    assert result.probability.shape == result.mask.shape
    assert result.heatmap.shape == (24, 24) and result.points.shape[-1] == 2
    assert result.question == question and result.threshold == threshold


def test_segment_image_one_shot_matches_segmenter(tiny_real_run, segmenter):
    text, is_sentence = tiny_real_run.query(0)
    one_shot = segment_image(tiny_real_run.image_path(0), text, run_dir=tiny_real_run.run_dir, is_sentence=is_sentence,
                             extractor=tiny_real_run.extractor, threshold=0.3)
    again = segmenter.segment(tiny_real_run.image_path(0), text, is_sentence=is_sentence, threshold=0.3)
    assert torch.equal(one_shot.logits, again.logits) and one_shot.threshold == 0.3
    assert np.array_equal(one_shot.mask, again.mask)


def test_cli_builds_the_backbone_live_and_writes_mask_and_overlay(tiny_real_run, segmenter, tmp_path):
    text, is_sentence = tiny_real_run.query(0)
    out = tmp_path / "out"
    args = [tiny_real_run.image_path(0), text, "--checkpoint", str(tiny_real_run.run_dir), "-o", str(out),
            "--device", "cpu", *([] if is_sentence else ["--phrase"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    image = Image.open(tiny_real_run.image_path(0))
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (image.height, image.width) and set(np.unique(mask)) <= {0, 255}
    # The CLI built a fresh tiny LLaVA + SAM from the run's recorded identity: same mask as the cache's backbone.
    expected = segmenter.segment(image, text, is_sentence=is_sentence)
    assert np.array_equal(mask == 255, expected.mask)
    assert Image.open(out / "overlay.png").size == image.size
    assert (out / "panels.png").is_file()
    summary = json.loads((out / "result.json").read_text())
    assert summary["mask_pixels"] == int(expected.mask.sum()) and summary["instruction"] == text


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_errors_are_one_line(tiny_real_run, tmp_path):
    run_dir = str(tiny_real_run.run_dir)
    missing = _one_line_error([str(tmp_path / "nope.jpg"), "the cat", "--checkpoint", run_dir, "-o", str(tmp_path)])
    assert "image not found" in missing and "nope.jpg" in missing

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png" * 8)
    assert "cannot read image" in _one_line_error([str(corrupt), "the cat", "--checkpoint", run_dir, "-o", str(tmp_path)])

    no_run = _one_line_error([tiny_real_run.image_path(0), "the cat", "--checkpoint", str(tmp_path / "no-run"),
                              "-o", str(tmp_path)])
    assert "checkpoint folder not found" in no_run

    bad_threshold = _one_line_error([tiny_real_run.image_path(0), "x", "--checkpoint", run_dir, "-o", str(tmp_path),
                                     "--threshold", "1.5"])
    assert "--threshold" in bad_threshold


def test_refuses_another_backbone(tiny_real_run):
    from lens_train.training.run_config import read_run_config

    config = read_run_config(tiny_real_run.run_dir)
    live = dict(tiny_real_run.extractor.identity)
    # Where the checkpoint lies and which layers the store kept do not change the features.
    check_backbone({**live, "name_or_path": "/somewhere/else", "layers": [14, 30]}, config, "run")
    with pytest.raises(UserError, match=r"weights_fingerprint.*--mllm") as error:
        check_backbone({**live, "weights_fingerprint": "0" * 64}, config, "run")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"sam\.weights.*--sam"):
        check_backbone({**live, "sam": {**live["sam"], "weights": "sha256:abc"}}, config, "run")
    with pytest.raises(UserError, match=r"compute_dtype.*--dtype float32"):
        check_backbone({**live, "compute_dtype": "bfloat16"}, config, "run")


def test_overlay_keeps_size_and_marks_the_mask():
    image = Image.new("RGB", (40, 30), (0, 0, 0))
    mask = np.zeros((30, 40), dtype=bool)
    mask[10:20, 5:15] = True
    out = np.asarray(overlay_image(image, mask, keypoints_xy=np.array([[30.0, 5.0]])))
    assert out.shape == (30, 40, 3)
    assert out[15, 10, 1] > 50 and out[25, 35].sum() == 0  # tinted inside, untouched far outside
    assert out[5, 30].min() == 255  # the keypoint dot
    with pytest.raises(ValueError):
        overlay_image(image, mask[:10])


@pytest.mark.parametrize("instruction", ["", "   \t "])
def test_an_empty_instruction_is_refused(tiny_real_run, tmp_path, instruction):
    """Issue 11: an empty or blank instruction was segmented (whatever the model made of nothing)."""
    run_dir = str(tiny_real_run.run_dir)
    line = _one_line_error([tiny_real_run.image_path(0), instruction, "--checkpoint", run_dir, "-o", str(tmp_path / "o")])
    assert line == 'error: the instruction is empty: say what to segment, e.g. "the mug left of the laptop"'
    with pytest.raises(UserError, match="the instruction is empty"):
        segment_image(tiny_real_run.image_path(0), instruction, run_dir=run_dir, extractor=tiny_real_run.extractor)
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_file_is_one_line(tiny_real_run, tmp_path):
    """Issue 11: `lens-segment -o EXISTING_FILE` ran the models, then died with a FileExistsError traceback."""
    existing = tmp_path / "result.png"
    existing.write_bytes(b"mine")
    line = _one_line_error([tiny_real_run.image_path(0), "the cat", "--checkpoint", str(tiny_real_run.run_dir),
                            "-o", str(existing)])
    assert line == f"error: -o/--out {existing} is a file, not a folder: give a folder (it is created if missing)"
    assert existing.read_bytes() == b"mine"


def test_a_run_of_another_backbone_is_refused_before_its_model_is_built(tiny_real_run, monkeypatch):
    """Issue 24 row 9: other backbones named on the command line are checked against the run's identity
    before the LENS model is built (a SAM of another width would otherwise fail inside build_lens)."""
    import lens_train.inference.segmenter as segment_module

    built = []
    monkeypatch.setattr("lens_train.training.loading.build_model", lambda *a, **k: built.append(a) or 1 / 0)
    with pytest.raises(segment_module.UserError, match="not the one run .* was trained on"):
        segment_module.Segmenter(tiny_real_run.run_dir, mllm="tiny", sam="toy", device="cpu")
    assert not built
