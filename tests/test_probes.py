"""The diagnostic probes in benchmarks/probes/ compute what they say (RESULTS.md: What learns on CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

PROBES = Path(__file__).resolve().parents[1] / "benchmarks" / "probes"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, PROBES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ridge_r2_recovers_a_linear_code_and_rejects_noise():
    probe = load("probe_features")
    gen = torch.Generator().manual_seed(0)
    targets = [torch.rand(50, 3, generator=gen) for _ in range(6)]
    mixing = torch.randn(3, 16, generator=gen)
    linear = [t @ mixing + 0.001 * torch.randn(50, 16, generator=gen) for t in targets]
    noise = [torch.randn(50, 16, generator=gen) for _ in targets]
    assert probe.ridge_r2(linear, targets, num_fit=4) > 0.99
    assert probe.ridge_r2(noise, targets, num_fit=4) < 0.1


def test_patch_colours_follow_sams_padded_frame():
    probe = load("probe_features")
    # 512 x 256 (w x h): resized to 1024 x 512 inside the frame, the bottom half is padding.
    image = Image.fromarray(np.full((256, 512, 3), (255, 0, 51), dtype=np.uint8))
    colours = probe.patch_colours(image, 4).reshape(4, 4, 3)
    torch.testing.assert_close(colours[:2], torch.tensor([1.0, 0.0, 0.2]).expand(2, 4, 3), atol=1e-3, rtol=0)
    assert colours[2:].abs().max().item() == 0.0


def test_grounding_probe_scores_a_planted_map(monkeypatch):
    probe = load("probe_grounding")

    class PlantedHead(torch.nn.Module):
        """Puts the map's peak on the target's first cell, or off it when ``hit`` is False."""

        def __init__(self, hit: bool):
            super().__init__()
            self.hit = hit

        def forward(self, image_states, text_states, text_lengths):
            maps = torch.full((len(self.batch.gts), 4, 4), 0.1)
            for k in range(len(maps)):
                target = probe._frame_target(self.batch, k, 4)
                cells = target.nonzero() if self.hit else (~target).nonzero()
                maps[k, cells[0, 0], cells[0, 1]] = 1.0
            return type("Out", (), {"heatmap": maps})

    from lens_train.training.data import Batch

    gts = [torch.zeros(8, 8, dtype=torch.uint8) for _ in range(2)]
    gts[0][:4, :4] = 1  # top-left quarter of the frame = 4 of 16 cells
    gts[1][4:, 4:] = 1
    batch = Batch(image_states=torch.zeros(2, 16, 4), text_states=torch.zeros(2, 1, 4),
                  text_lengths=torch.ones(2, dtype=torch.long), sam_embeddings=torch.zeros(2, 1, 1, 1), gts=gts,
                  original_sizes=torch.tensor([[8, 8]] * 2), input_sizes=torch.tensor([[1024, 1024]] * 2),
                  query_ids=torch.arange(2), store_indices=torch.zeros(2, dtype=torch.long),
                  tasks=["referring"] * 2, datasets=["x"] * 2, is_sentence=torch.zeros(2, dtype=torch.bool))
    monkeypatch.setattr(probe, "collate", lambda items: batch)
    for hit in (True, False):
        head = PlantedHead(hit)
        head.batch = batch
        row = probe.score(head, [0, 1], grid=4)
        assert row["chance"] == pytest.approx(0.25)
        assert row["peak_hit"] == (1.0 if hit else 0.0)
        # thresholded at 0.5 only the peak cell is on: IoU 1/4 when it hits, 0 when not
        assert row["iou24"] == pytest.approx(0.25 if hit else 0.0)


def test_decomposition_counts_peak_hits_and_keypoints_on_target():
    decompose = load("decompose_run")
    cells = torch.zeros(4, 4, dtype=torch.bool)
    cells[1:3, 1:4] = True  # the target: rows 1-2, columns 1-3
    heatmap = torch.zeros(4, 4)
    heatmap[2, 1] = 1.0  # peak on the target
    points = torch.tensor([[3.2, 0.9], [0.0, 3.0], [2.0, 1.0]])  # (x, y): on, off, on
    record = decompose.query_record(heatmap, points, torch.tensor([True, True, False]), cells)
    assert record == {"peak_hit": True, "keypoints": 2, "keypoints_on_target": 0.5}
    heatmap = torch.zeros(4, 4)
    heatmap[0, 3] = 1.0
    miss = decompose.query_record(heatmap, points, torch.tensor([True, False, True]), cells)
    assert miss == {"peak_hit": False, "keypoints": 2, "keypoints_on_target": 1.0}
    summary = decompose.summarize([{**record, "iou": 0.2}, {**miss, "iou": 0.8}, {**miss, "iou": 0.4}])
    assert summary["peak_hit_rate"] == pytest.approx(1 / 3)
    assert summary["giou_given_peak_hit"] == pytest.approx(0.2)
    assert summary["giou_given_peak_miss"] == pytest.approx(0.6)
    assert summary["giou_given_all_keypoints_on_target"] == pytest.approx(0.6)
    assert summary["all_keypoints_on_target_rate"] == pytest.approx(2 / 3)


def test_target_cells_follow_sams_padded_frame():
    decompose = load("decompose_run")
    # 64 x 128 (h x w): the frame's bottom half is padding; the target is the image's left half.
    gt = torch.zeros(64, 128, dtype=torch.uint8)
    gt[:, :64] = 1
    cells = decompose.target_cells(gt, (512, 1024), 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(cells, expected)
