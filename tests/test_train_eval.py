"""lens-eval: metrics against an independent computation, output files, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lens_train.cli import eval_app
from lens_train.training.trainer import TrainRequest, train

FAST = {"batch_size": 2, "grad_accum": 1, "num_workers": 0, "log_every": 1, "warmup_steps": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run on a fake-backbone store, and stores to evaluate it on."""
    from lens_manifests import build_manifest

    from lens_train.testing import build_store, small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=2)
    out = tmp_path_factory.mktemp("stores")
    train_store = build_store(build_manifest("synthetic:train", root), out / "train", spec="synthetic:train")
    val_store = build_store(build_manifest("synthetic:val", root), out / "val", spec="synthetic:val")
    other = build_store(build_manifest("synthetic:val", root), out / "other", spec="synthetic:val", mllm="another-mllm")
    run = tmp_path_factory.mktemp("runs") / "run"
    train(TrainRequest(caches=(train_store.url,), out=run, preset="tiny", train_overrides={**FAST, "steps": 2},
                       device="cpu", quiet=True))
    return {"run": run, "val": val_store, "other": other.url}


def _by_hand(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Foreground intersection and union of a (H, W) bool prediction, gt pixels 255 left out."""
    keep = gt != 255
    return int((pred & (gt == 1) & keep).sum()), int(((pred | (gt == 1)) & keep).sum())


def test_metrics_match_an_independent_computation(trained, tmp_path):
    from lens_manifests import decode_target

    from lens_train.training.data import QueryDataset, collate
    from lens_train.evaluation.evaluate import evaluate, predict
    from lens_train.training.loading import load_run

    out = tmp_path / "eval"
    metrics = evaluate(trained["run"], trained["val"].url, out=out, figures=3, log=lambda line: None)

    # Recompute every query's mask with the loaded model, one query at a time, and the IoUs by hand.
    run = load_run(trained["run"])
    dataset = QueryDataset(trained["val"].url, 14)
    manifest = trained["val"].manifest
    inters, unions, sentence, whole, heat = [], [], [], [], []
    for index in range(len(dataset)):
        item = dataset[index]
        output, logits = predict(run.model, collate([item]).to("cpu"))
        pred = torch.sigmoid(logits[0]).numpy() > 0.5
        gt = decode_target(manifest, item["query_id"])
        inter, union = _by_hand(pred, gt)
        inters.append(inter)
        unions.append(union)
        sentence.append(item["is_sentence"])
        keep = gt != 255
        whole.append(float((gt == 1).sum()) / max(1, int(keep.sum())))
        # The heatmap baseline: the (g, g) map over SAM's padded 1024 frame, upsampled to the frame,
        # the padding cut off, resized to the image, thresholded at half its peak.
        grid = output.heatmap[0].float()
        (h, w), (height, width) = item["input_size"].tolist(), item["original_size"].tolist()
        frame = F.interpolate(grid[None, None], (1024, 1024), mode="bilinear", align_corners=False)
        on_image = F.interpolate(frame[..., :h, :w], (height, width), mode="bilinear", align_corners=False)[0, 0]
        inter, union = _by_hand((on_image > 0.5 * grid.max()).numpy(), gt)
        heat.append(1.0 if union == 0 else inter / union)
    ious = [1.0 if u == 0 else i / u for i, u in zip(inters, unions)]
    assert metrics["num_queries"] == len(dataset)
    assert metrics["giou"] == pytest.approx(float(np.mean(ious)), abs=1e-6)
    assert metrics["ciou"] == pytest.approx(sum(inters) / sum(unions), abs=1e-6)
    sentence = np.asarray(sentence)
    assert metrics["long"]["num_queries"] == int(sentence.sum())
    assert metrics["short"]["num_queries"] == int((~sentence).sum())
    if sentence.any():
        assert metrics["long"]["giou"] == pytest.approx(float(np.mean(np.asarray(ious)[sentence])), abs=1e-6)

    assert metrics["baselines"]["whole_image"]["giou"] == pytest.approx(float(np.mean(whole)), abs=1e-6)
    assert metrics["baselines"]["heatmap"]["giou"] == pytest.approx(float(np.mean(heat)), abs=1e-6)

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["giou"] == pytest.approx(metrics["giou"]) and {"ciou", "short", "long"} <= set(on_disk)
    table = pq.read_table(out / "per_query.parquet").to_pydict()
    assert table["inter"] == inters and table["union"] == unions
    assert table["iou_whole_image"] == pytest.approx(whole, abs=1e-9)
    assert table["iou_heatmap"] == pytest.approx(heat, abs=1e-6)
    assert len(set(np.round(heat, 6))) > 1  # the baseline is not a constant the check could miss
    assert (out / "overlays.png").stat().st_size > 0


def test_the_threshold_is_the_one_applied_to_the_logits(trained, tmp_path):
    from lens_manifests import decode_target

    from lens_train.training.data import QueryDataset, collate
    from lens_train.evaluation.evaluate import evaluate, predict
    from lens_train.training.loading import load_run

    run = load_run(trained["run"])
    dataset = QueryDataset(trained["val"].url, 14)
    count = 6
    probabilities, gts = [], []
    for index in range(count):
        item = dataset[index]
        _, logits = predict(run.model, collate([item]).to("cpu"))
        probabilities.append(torch.sigmoid(logits[0]).numpy())
        gts.append(decode_target(trained["val"].manifest, item["query_id"]))
    # Two thresholds that split the predicted probabilities of these queries differently.
    low, high = np.quantile(np.concatenate([p.ravel() for p in probabilities]), [0.25, 0.75]).tolist()
    by_threshold = {}
    for name, threshold in (("low", low), ("high", high)):
        metrics = evaluate(trained["run"], trained["val"].url, out=tmp_path / name, threshold=threshold, figures=0,
                           limit=count, log=lambda line: None)
        table = pq.read_table(tmp_path / name / "per_query.parquet").to_pydict()
        expected = [_by_hand(p > threshold, gt) for p, gt in zip(probabilities, gts)]
        assert list(zip(table["inter"], table["union"])) == expected
        assert metrics["threshold"] == threshold and metrics["num_queries"] == count
        by_threshold[name] = expected
    assert by_threshold["low"] != by_threshold["high"]  # so a threshold that is ignored cannot pass


def _eval_error(args: list[str]) -> str:
    result = CliRunner().invoke(eval_app, [*args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_refuses_a_store_of_another_backbone(trained):
    line = _eval_error(["--checkpoint", str(trained["run"]), "--cache", trained["other"]])
    assert "another backbone" in line and "another-mllm" in line


def test_refuses_a_checkpoint_of_another_preset(trained, tmp_path):
    # The weights of this run, under a config.json that says the head is wider: they do not fit.
    run = tmp_path / "mismatch"
    shutil.copytree(trained["run"], run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["mlp_size"] = 2 * config["model"]["mlp_size"]
    (run / "config.json").write_text(json.dumps(config))
    line = _eval_error(["--checkpoint", str(run), "--cache", trained["val"].url])
    assert "model.safetensors" in line and "mlp" in line


def test_refuses_a_folder_that_is_not_a_run(trained, tmp_path):
    line = _eval_error(["--checkpoint", str(tmp_path), "--cache", trained["val"].url])
    assert "not a lens-train run" in line


def test_cli_writes_the_outputs(trained, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(eval_app, ["--checkpoint", str(trained["run"]), "--cache", trained["val"].url,
                                           "--out", str(out), "--limit", "4", "--figures", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "gIoU" in result.output
    assert {p.name for p in Path(out).iterdir()} >= {"metrics.json", "per_query.parquet", "overlays.png"}


@pytest.mark.parametrize("kind", ["deleted", "truncated", "flipped", "manifest"])
def test_a_damaged_store_is_refused_in_one_line(trained, tmp_path, kind):
    """Issue 11: a deleted chunk was read as zeros (exit 0, another gIoU); now one line names it and the fix."""
    from lens_cache.testing import damage_chunk

    copy = tmp_path / "damaged"
    shutil.copytree(trained["val"].location.local_path, copy)
    if kind == "manifest":
        data = (copy / "manifest.parquet").read_bytes()
        (copy / "manifest.parquet").write_bytes(data[:-20] + b"x" * 20)
        found = "manifest.parquet is unreadable"
    else:
        damage_chunk(copy / "images" / "sam" / "c" / "0" / "0" / "0" / "0", kind)  # the first query's image
        found = "image 0 is damaged (images/sam: "
    line = _eval_error(["--checkpoint", str(trained["run"]), "--cache", str(copy), "--figures", "0",
                        "--out", str(tmp_path / "eval")])
    assert line.startswith(f"error: store {copy}: ") and found in line
    assert line.endswith(f"`lens-cache build ... --out {copy}` command that made it (it recomputes only the damaged blocks)")
    assert not (tmp_path / "eval" / "metrics.json").exists()
