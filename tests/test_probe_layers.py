"""``lens-cache probe-layers``: the scores against hand computations, the attention maps against a plain
forward, and the command end to end on the tiny LLaVA and the tiny Qwen2-VL (cache/README.md)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from lens_cache.cli import app
from lens_cache.probe_layers import (
    chance_level,
    rank_layers,
    recommended_layer,
    score_maps,
    summarise,
    target_cells,
)
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()
#: decoder layers of the tiny models built in code (tiny_llava.py: 32 as LLaVA-1.5-7B; tiny_qwen2vl.py: 28)
TINY_LAYERS = {"tiny": 32, "tiny-qwen2vl": 28}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from lens_manifests import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, seed=0, num_train_images=1, num_val_images=2, num_test_images=1, workers=1)
    return root


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def planted_maps(target: torch.Tensor, layers: int = 6, hit_layer: int = 3) -> torch.Tensor:
    """Layer ``hit_layer`` is 1 on the target and 0.1 elsewhere; layer 1 peaks on cell (0, 0) with 0.6 on the
    target's first two cells; every other layer peaks on the last cell alone."""
    g = target.shape[0]
    maps = torch.full((layers, g, g), 0.1)
    maps[:, -1, -1] = 1.0
    maps[hit_layer] = torch.where(target, 1.0, 0.1)
    maps[1] = 0.1
    maps[1, 0, 0] = 1.0
    cells = target.flatten().nonzero()[:2, 0]
    maps[1].view(-1)[cells] = 0.6
    return maps


def test_scores_of_planted_maps_equal_a_hand_computation_and_rank_the_planted_layer_first():
    centre = torch.zeros(4, 4, dtype=torch.bool)
    centre[1:3, 1:3] = True  # 4 target cells
    corner = torch.zeros(4, 4, dtype=torch.bool)
    corner[3, 0] = True  # 1 target cell
    pointing, iou = score_maps(planted_maps(centre), centre)
    # layer 3: peak and the cells above half its peak are the target; layer 1: peak off target, 2 of
    # its 3 cells above 0.5 on a 4-cell target (union 5); others: one cell (3, 3), off target.
    assert pointing.tolist() == [0, 0, 0, 1, 0, 0]
    assert iou.tolist() == pytest.approx([0, 2 / 5, 0, 1, 0, 0])
    pointing2, iou2 = score_maps(planted_maps(corner), corner)
    assert pointing2.tolist() == [0, 0, 0, 1, 0, 0]
    assert iou2.tolist() == pytest.approx([0, 1 / 2, 0, 1, 0, 0])  # layer 1: cells (0,0), (3,0); 1 target cell

    rows = summarise(np.stack([pointing.numpy(), pointing2.numpy()]), np.stack([iou.numpy(), iou2.numpy()]))
    assert [r["layer"] for r in rows] == list(range(6)) and {r["n"] for r in rows} == {2}
    assert rows[3]["pointing_game"] == 1.0 and rows[3]["iou"] == 1.0 and rows[3]["pointing_game_se"] == 0.0
    assert rows[1]["pointing_game"] == 0.0 and rows[1]["iou"] == pytest.approx((2 / 5 + 1 / 2) / 2, abs=1e-4)
    assert rank_layers(rows)[0] == 3 and rank_layers(rows, "iou")[:2] == [3, 1]
    assert recommended_layer(rows) == 3
    assert chance_level(centre) == 4 / 16 and chance_level(corner) == 1 / 16


def test_layer_zero_is_never_recommended():
    rows = summarise(np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), np.array([[0.5, 0.0, 0.2], [0.5, 0.0, 0.0]]))
    assert rank_layers(rows)[0] == 0  # the embeddings' layer scores best...
    assert recommended_layer(rows) == 2  # ...but a store caches hidden_states[k >= 1] only


def test_target_cells_follow_sams_padded_frame():
    # 256 x 512 (h x w): resized to 512 x 1024 inside SAM's 1024 frame; the bottom half is padding.
    gt = np.zeros((256, 512), dtype=np.uint8)
    gt[:, :256] = 1  # the left half is the target...
    gt[:, 384:] = 255  # ...the right quarter is ignored: not a target
    cells = target_cells(gt, (512, 1024), grid=4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(cells, expected)
    assert chance_level(cells) == 4 / 16


@pytest.mark.parametrize("mllm", ["tiny", "tiny-qwen2vl"])
def test_attention_maps_equal_a_plain_forward_of_the_processors_inputs(mllm):
    from lens_cache.backbones import build_mllm
    from lens_cache.backbones.geometry import sam_frame
    from lens_cache.backbones.layer_capture import attention_implementations

    backbone = build_mllm(mllm, layers=(1,), device="cpu")
    before = attention_implementations(backbone.model.config)
    pixels = np.random.default_rng(0).integers(0, 256, size=(200, 320, 3), dtype=np.uint8)
    image = sam_frame(Image.fromarray(pixels)).padded_image()
    question = backbone.question_for("red circle", is_sentence=False)
    maps = backbone.image_attention_by_layer(image, question)
    grid = backbone.grid_size
    assert grid == 24 and tuple(maps.shape) == (TINY_LAYERS[mllm], grid, grid)
    assert attention_implementations(backbone.model.config) == before  # the adapter's forwards are unchanged

    # The reference: the processor's own ids and pixels (and, for Qwen2-VL, the model's own M-RoPE ids).
    inputs = backbone.processor(text=backbone.prompt_for(question), images=image, return_tensors="pt")
    backbone.model.set_attn_implementation("eager")
    with torch.inference_mode():
        out = backbone.model.model(**inputs, output_attentions=True)
    image_tokens = (inputs["input_ids"][0] == backbone.image_token_id).nonzero()[:, 0]
    reference = torch.stack([a[0, :, -1, image_tokens].mean(0) for a in out.attentions]).reshape(-1, grid, grid)
    torch.testing.assert_close(maps, reference, atol=1e-6, rtol=1e-5)
    assert float(maps.sum(dim=(1, 2)).max()) <= 1.0 + 1e-5  # a share of the last token's attention


@pytest.mark.parametrize("mllm", ["tiny", "tiny-qwen2vl"])
def test_cli_probe_layers_writes_one_row_per_decoder_layer(mllm, synthetic_root, tmp_path):
    out = tmp_path / "probe"
    result = runner.invoke(app, ["probe-layers", "--split", "synthetic:val", "--data-root", str(synthetic_root),
                                 "--mllm", mllm, "--limit", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    layers = TINY_LAYERS[mllm]
    assert "a preset's default layer should be" in result.stdout
    assert "[lens-cache probe-layers] 2/2 images" in result.stderr and "ETA" in result.stderr

    report = json.loads((out / "probe_layers.json").read_text())
    assert report["mllm"] == mllm and report["grid_size"] == 24 and report["num_layers"] == layers
    assert [r["layer"] for r in report["layers"]] == list(range(layers))
    n = report["queries"]
    assert n > 0 and all(r["n"] == n for r in report["layers"])
    for r in report["layers"]:
        assert 0.0 <= r["pointing_game"] <= 1.0 and 0.0 <= r["iou"] <= 1.0
        assert r["pointing_game"] * n == pytest.approx(round(r["pointing_game"] * n), abs=0.01)  # hits / n
    assert 0.0 < report["chance"] < 1.0
    assert 1 <= report["best"]["recommended_layer"] < layers
    assert f"should be {report['best']['recommended_layer']} " in result.stdout

    with (out / "probe_layers.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == layers and [int(r["layer"]) for r in rows] == list(range(layers))
    assert all(0.0 <= float(r[key]) <= 1.0 for r in rows for key in ("pointing_game", "iou", "chance"))
    with Image.open(out / "probe_layers.png") as plot:
        assert plot.format == "PNG" and plot.width > 100


def test_cli_probe_layers_user_errors_are_one_line(synthetic_root, tmp_path, monkeypatch):
    common = ["probe-layers", "--data-root", str(synthetic_root), "--out", str(tmp_path / "p"), "--device", "cpu"]
    no_split = "error: give --split SPEC (e.g. refcoco:val) or --manifest FILE.parquet"
    assert one_line_error(runner.invoke(app, common)) == no_split
    result = runner.invoke(app, [*common, "--split", "synthetic:val", "--limit", "0"])
    assert one_line_error(result) == "error: --limit must be >= 1, got 0"
    result = runner.invoke(app, [*common, "--split", "synthetic:val", "--mllm", str(tmp_path / "no-such-model")])
    assert one_line_error(result).startswith("error: MLLM checkpoint not found at ")
    result = runner.invoke(app, [*common, "--split", "synthetic:val", "--device", "tpu"])
    assert one_line_error(result) == "error: --device takes cpu, cuda or cuda:N, got 'tpu'"

    # A split whose every target is below one grid cell: nothing to score.
    import lens_cache.probe_layers as probe

    monkeypatch.setattr(probe, "target_cells", lambda gt, input_size, grid: torch.zeros(grid, grid, dtype=torch.bool))
    result = runner.invoke(app, [*common, "--split", "synthetic:val", "--limit", "1", "--quiet"])
    assert one_line_error(result).startswith("error: no query could be scored (")
    assert not (tmp_path / "p" / "probe_layers.json").exists()
