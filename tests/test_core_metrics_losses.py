"""Metrics (LISA's gIoU/cIoU) on hand-computed cases, and the losses against direct formulas."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lens_core.geometry import mask_to_padded_frame, postprocess_masks, resized_shape
from lens_core.losses import attention_loss, dice_loss, segmentation_loss, sigmoid_bce
from lens_core.metrics import giou_ciou, giou_ciou_from_counts, intersection_union


def test_iou_by_hand_with_ignore_and_empty():
    gt1 = np.zeros((4, 4), np.uint8)
    gt1[0, :] = 1  # 4 target pixels
    gt1[3, 3] = 255
    pred1 = np.zeros((4, 4), bool)
    pred1[0, :2] = True  # 2 hits
    pred1[1, 0] = True  # 1 false positive
    pred1[3, 3] = True  # on ignore: not counted
    assert intersection_union(pred1, gt1) == (2, 5)
    gt2 = np.zeros((3, 3), np.uint8)  # empty target, empty prediction: IoU 1
    pred2 = np.zeros((3, 3), bool)
    gt3 = np.ones((2, 2), np.uint8)  # total miss
    pred3 = np.zeros((2, 2), bool)
    giou, ciou = giou_ciou([pred1, pred2, pred3], [gt1, gt2, gt3])
    assert giou == pytest.approx((2 / (5 + 1e-5) + 1.0 + 0.0) / 3, abs=1e-9)
    assert ciou == pytest.approx(2 / (5 + 0 + 4), abs=1e-5)


def test_giou_ciou_from_counts_by_hand_and_as_lens_eval_reports_them():
    from lens_train.evaluation.evaluate import summarize

    inters, unions = [2, 0, 0, 7], [5, 0, 4, 7]  # a partial hit, nothing to find, a miss, a perfect mask
    giou = (2 / 5.00001 + 1.0 + 0.0 + 7 / 7.00001) / 4  # LISA: inter / (union + 1e-5), an empty union is 1
    ciou = 9 / 16.00001
    assert giou_ciou_from_counts(inters, unions) == pytest.approx((giou, ciou), abs=1e-12)
    assert giou_ciou_from_counts([0, 0], [0, 0]) == (1.0, 1.0)  # every union empty: cIoU 1 as well
    # lens-eval's metrics.json is the same numbers, with the count, and None for an empty subset.
    assert summarize(np.asarray(inters, dtype=np.int64), np.asarray(unions, dtype=np.int64)) == pytest.approx(
        {"giou": giou, "ciou": ciou, "num_queries": 4}, abs=1e-12)
    assert summarize([], []) == {"giou": None, "ciou": None, "num_queries": 0}
    with pytest.raises(ValueError, match="at least one"):
        giou_ciou_from_counts([], [])
    with pytest.raises(ValueError, match="2 intersections but 1 unions"):
        giou_ciou_from_counts([1, 2], [3])


def test_metrics_reject_mismatches():
    with pytest.raises(ValueError, match="shape"):
        giou_ciou([np.zeros((2, 2), bool)], [np.zeros((3, 3), np.uint8)])
    with pytest.raises(ValueError, match="more ground truths"):
        giou_ciou([np.zeros((2, 2), bool)], [np.zeros((2, 2), np.uint8)] * 2)


def test_bce_and_dice_match_direct_formulas_and_ignore_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    gt = (torch.rand(6, 5, generator=g) > 0.5).to(torch.uint8)
    keep = torch.ones(6, 5, dtype=torch.bool)
    gt[0, 0] = 255
    keep[0, 0] = False
    manual_bce = F.binary_cross_entropy_with_logits(logits[keep], gt[keep].float())
    assert sigmoid_bce(logits, gt).item() == pytest.approx(manual_bce.item(), rel=1e-6)
    p, t = torch.sigmoid(logits[keep]) / 1000, gt[keep].float() / 1000
    manual_dice = 1 - (2 * (p * t * 1000).sum() + 1e-6) / (p.sum() + t.sum() + 1e-6)
    assert dice_loss(logits, gt).item() == pytest.approx(manual_dice.item(), rel=1e-5)
    changed = logits.clone()
    changed[0, 0] = 50.0  # an ignored pixel's logit does not matter
    assert sigmoid_bce(changed, gt).item() == pytest.approx(sigmoid_bce(logits, gt).item())


def test_segmentation_loss_weights():
    logits = [torch.randn(4, 4), torch.randn(3, 5)]
    gts = [torch.ones(4, 4, dtype=torch.uint8), torch.zeros(3, 5, dtype=torch.uint8)]
    out = segmentation_loss(logits, gts, dice_weight=2.0, bce_weight=4.0)
    assert out["seg"].item() == pytest.approx(2 * out["dice"].item() + 4 * out["bce"].item())
    with pytest.raises(ValueError, match="differ in size"):
        segmentation_loss([torch.randn(4, 4)], [torch.zeros(4, 5, dtype=torch.uint8)], dice_weight=1, bce_weight=1)


def test_attention_loss_lives_on_the_padded_frame():
    # A 512x1024 image fills the top half of SAM's frame; a target in its left half.
    gt = torch.zeros(512, 1024, dtype=torch.uint8)
    gt[:, :512] = 1
    input_size = resized_shape(512, 1024)
    assert input_size == (512, 1024)
    target = mask_to_padded_frame((gt == 1).float(), input_size, 8)
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1
    assert torch.equal(target, expected)
    perfect = torch.full((1, 24, 24), 1e-6)
    perfect[0, :12, :12] = 1 - 1e-6
    wrong = 1 - perfect
    good = attention_loss(perfect, [gt], [input_size], size=128)
    bad = attention_loss(wrong, [gt], [input_size], size=128)
    assert good.item() < 0.05 < 5.0 < bad.item()


def test_postprocess_crops_padding_then_resizes():
    low = torch.zeros(1, 1, 256, 256)
    low[..., :128, :] = 5.0  # the top half of the padded frame
    out = postprocess_masks(low, (512, 1024), (300, 600))
    assert out.shape == (1, 1, 300, 600)
    assert (out[0, 0] > 0).float().mean().item() > 0.95  # the whole image is in the top half
