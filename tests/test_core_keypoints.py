"""Keypoint NMS (S1.1) and the sub-pixel Newton step (S1.2) against independent computations."""


import numpy as np
import pytest
import torch

from lens_core.keypoints import nms_keypoints, subpixel_refine


def reference_nms(heat: np.ndarray, max_points: int, radius: float, min_ratio: float):
    """Plain-python greedy NMS, written from the supplement's wording."""
    work = heat.astype(np.float64).copy()
    peak = heat.max()
    picks = []
    while len(picks) < max_points and work.max() > 0:
        y, x = np.unravel_index(int(np.argmax(work)), work.shape)
        picks.append((x, y, heat[y, x]))
        for yy in range(work.shape[0]):
            for xx in range(work.shape[1]):
                if (xx - x) ** 2 + (yy - y) ** 2 <= radius**2:
                    work[yy, xx] = 0
    return [(x, y, s >= min_ratio * peak) for x, y, s in picks]


def quadratic_map(x0, y0, size=24, a=0.08, b=0.05, c=0.03):
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    return 10.0 - a * (xs - x0) ** 2 - b * (ys - y0) ** 2 - c * (xs - x0) * (ys - y0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_reference(seed):
    rng = np.random.default_rng(seed)
    heat = rng.random((24, 24)).astype(np.float32) ** 3
    heat[rng.random((24, 24)) < 0.5] = 0.0
    points, valid = nms_keypoints(torch.from_numpy(heat)[None], max_points=16, radius=4.0, min_ratio=0.4)
    expected = reference_nms(heat, 16, 4.0, 0.4)
    assert len(expected) >= 3
    for k, (x, y, ok) in enumerate(expected):
        assert points[0, k].tolist() == [float(x), float(y)]
        assert bool(valid[0, k]) == ok
    assert not valid[0, len(expected):].any()


def test_nms_radius_is_inclusive_and_scores_ordered():
    heat = torch.zeros(1, 24, 24)
    heat[0, 10, 10] = 1.0
    heat[0, 10, 14] = 0.9  # distance 4: suppressed
    heat[0, 15, 10] = 0.8  # distance 5: kept
    heat[0, 20, 20] = 0.3  # kept but below 0.4 x peak -> invalid
    points, valid = nms_keypoints(heat, max_points=16, radius=4.0, min_ratio=0.4)
    assert points[0, :3].tolist() == [[10.0, 10.0], [10.0, 15.0], [20.0, 20.0]]
    assert valid[0].tolist()[:4] == [True, True, False, False]


def test_nms_stops_at_max_points_and_on_empty_maps():
    heat = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(0)) + 0.1
    heat[1] = 0.0
    points, valid = nms_keypoints(heat, max_points=3, radius=1.0)
    assert points.shape == (2, 3, 2) and valid.shape == (2, 3)
    assert valid[0].all() or valid[0].sum() >= 1
    assert not valid[1].any()


def test_nms_batch_equals_single():
    heat = torch.rand(4, 24, 24, generator=torch.Generator().manual_seed(3))
    points, valid = nms_keypoints(heat)
    for b in range(4):
        p, v = nms_keypoints(heat[b : b + 1])
        assert torch.equal(p[0], points[b]) and torch.equal(v[0], valid[b])


@pytest.mark.parametrize("x0,y0", [(10.3, 7.8), (5.45, 16.2), (12.0, 12.0), (3.7, 3.35)])
def test_subpixel_recovers_quadratic_peak(x0, y0):
    heat = quadratic_map(x0, y0)[None]
    integer, _ = nms_keypoints(heat, max_points=1)
    assert integer[0, 0].tolist() == [round(x0), round(y0)]
    refined = subpixel_refine(heat, integer.double())
    assert refined[0, 0, 0].item() == pytest.approx(x0, abs=1e-3)
    assert refined[0, 0, 1].item() == pytest.approx(y0, abs=1e-3)


def test_subpixel_step_is_clipped_and_finite_on_flat_and_linear_maps():
    flat = torch.ones(1, 8, 8)
    pts = torch.tensor([[[3.0, 4.0]]])
    assert torch.equal(subpixel_refine(flat, pts), pts)
    ramp = torch.arange(8.0).repeat(8, 1)[None]  # linear in x: H = 0, step explodes -> clipped
    out = subpixel_refine(ramp, pts)
    assert torch.isfinite(out).all()
    assert (out - pts).abs().max().item() == pytest.approx(1.0)


def test_subpixel_diagonal_fallback_when_singular():
    # v = -(x - y)^2 / 2 around the point: H = [[-1, 1], [1, -1]] is singular; the diagonal
    # fallback gives delta_x = -Dx / (Dxx + eps) computed by hand below.
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    x0 = 3.3
    heat = (-0.5 * (xs - ys - (x0 - 4.0)) ** 2)[None]
    pts = torch.tensor([[[4.0, 4.0]]])
    out = subpixel_refine(heat, pts, eps=1e-6, ill_conditioned=1e-3)
    v0, v1, v2 = heat[0, 4, 4], heat[0, 4, 5], heat[0, 4, 3]
    dx, dxx = (v1 - v2) / 2, v1 - 2 * v0 + v2
    expected_x = 4.0 + float(torch.clamp(-dx / (dxx + 1e-6), -1, 1))
    assert out[0, 0, 0].item() == pytest.approx(expected_x, abs=1e-5)


def test_subpixel_is_differentiable_in_the_heatmap():
    heat = quadratic_map(10.3, 7.8).float()[None].requires_grad_(True)
    out = subpixel_refine(heat, torch.tensor([[[10.0, 8.0]]]))
    out.sum().backward()
    assert heat.grad is not None and heat.grad.abs().sum() > 0


def test_keypoint_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        nms_keypoints(torch.rand(24, 24))
    with pytest.raises(ValueError, match=r"\(B, K, 2\)"):
        subpixel_refine(torch.rand(2, 24, 24), torch.rand(3, 16, 2))
