"""Masks: RLE round trips, the two polygon rules, COCO segmentation forms, decode_target."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils

from lens_manifests.raster import draw_polygon_cv2, line_pixels
from lens_manifests.rle import (
    coco_segmentation_to_rle,
    decode_rle,
    decode_target,
    encode_mask,
    polygons_to_mask,
    rle_area,
    union_rle,
)
from lens_manifests.schema import MANIFEST_SCHEMA


def test_rle_round_trip_random_masks() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (64, 48), (200, 3)]:
        m = rng.random(shape) < 0.3
        counts = encode_mask(m)
        assert isinstance(counts, str)
        np.testing.assert_array_equal(decode_rle(counts, *shape), m)
        assert rle_area(counts, *shape) == m.sum()


def test_rectangle_polygon_fills_boundary_inclusive_cv2_rule() -> None:
    # LISA's cv2 rule includes the boundary: x 2..10, y 3..8 -> 9 * 6 pixels
    m = polygons_to_mask([[[2, 3], [10, 3], [10, 8], [2, 8]]], 12, 14, rule="cv2")
    assert m.sum() == 54
    expected = np.zeros((12, 14), dtype=bool)
    expected[3:9, 2:11] = True
    np.testing.assert_array_equal(m, expected)


def test_float_points_are_truncated_like_an_int32_cast() -> None:
    a = polygons_to_mask([[[2.9, 3.7], [10.2, 3.1], [10.99, 8.5], [2.5, 8.0]]], 12, 14, rule="cv2")
    b = polygons_to_mask([[[2, 3], [10, 3], [10, 8], [2, 8]]], 12, 14, rule="cv2")
    np.testing.assert_array_equal(a, b)


def test_triangle_cv2_rule_hand_checked() -> None:
    # right triangle (0,0) (4,0) (0,4): rows y have x in 0..4-y, outline included
    m = polygons_to_mask([[[0, 0], [4, 0], [0, 4]]], 6, 6, rule="cv2")
    expected = np.zeros((6, 6), dtype=bool)
    for y in range(5):
        expected[y, : 5 - y] = True
    np.testing.assert_array_equal(m, expected)


def test_bresenham_lines() -> None:
    xs, ys = line_pixels(0, 0, 5, 2)
    assert list(zip(xs.tolist(), ys.tolist(), strict=True)) == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    xs, ys = line_pixels(3, 3, 3, 3)
    assert (xs.tolist(), ys.tolist()) == ([3], [3])


def test_coco_rule_matches_pycocotools() -> None:
    poly = [[1.5, 1.0], [9.0, 2.0], [7.5, 8.5], [2.0, 7.0]]
    ours = polygons_to_mask([poly], 10, 12, rule="coco")
    ref = mask_utils.decode(mask_utils.frPyObjects([np.ravel(poly).tolist()], 10, 12))[..., 0].astype(bool)
    np.testing.assert_array_equal(ours, ref)


def test_cv2_rule_matches_opencv_when_available() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(10, 60, size=2))
        pts = rng.uniform(-8, [w + 8, h + 8], size=(int(rng.integers(3, 10)), 2))
        ref = np.zeros((h, w), np.uint8)
        arr = np.array([pts], dtype=np.int32)
        cv2.polylines(ref, arr, True, 1, 1)
        cv2.fillPoly(ref, arr, 1)
        ours = np.zeros((h, w), np.uint8)
        draw_polygon_cv2(ours, pts, 1)
        np.testing.assert_array_equal(ours, ref)


def test_coco_segmentation_forms_agree() -> None:
    h, w = 20, 30
    poly = [3.0, 4.0, 20.0, 4.0, 20.0, 15.0, 3.0, 15.0]
    from_poly = coco_segmentation_to_rle([poly], h, w)
    m = decode_rle(from_poly, h, w)
    assert m.sum() > 0
    compressed = {"size": [h, w], "counts": from_poly}
    assert coco_segmentation_to_rle(compressed, h, w) == from_poly
    assert coco_segmentation_to_rle([compressed], h, w) == from_poly
    assert coco_segmentation_to_rle({"size": [h, w], "counts": from_poly.encode()}, h, w) == from_poly
    # uncompressed RLE: column-major run lengths starting with a background run
    flat = m.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], changes])).tolist()
    assert decode_rle(coco_segmentation_to_rle({"size": [h, w], "counts": runs}, h, w), h, w).sum() == m.sum()
    # an empty segmentation is an empty mask; two parts are merged
    assert rle_area(coco_segmentation_to_rle([], h, w), h, w) == 0
    second = [22.0, 1.0, 28.0, 1.0, 28.0, 6.0]
    both = decode_rle(coco_segmentation_to_rle([poly, second], h, w), h, w)
    assert both.sum() > m.sum() and (both & m).sum() == m.sum()


def test_coco_segmentation_size_mismatch_is_an_error() -> None:
    counts = encode_mask(np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="does not match"):
        coco_segmentation_to_rle({"size": [4, 4], "counts": counts}, 5, 4)


def test_union_rle() -> None:
    a = np.zeros((6, 6), bool)
    a[0, 0] = True
    b = np.zeros((6, 6), bool)
    b[5, 5] = True
    np.testing.assert_array_equal(decode_rle(union_rle([encode_mask(a), encode_mask(b)], 6, 6), 6, 6), a | b)


def test_decode_target_ignore_wins() -> None:
    target = np.zeros((5, 5), bool)
    target[1:4, 1:4] = True
    ignore = np.zeros((5, 5), bool)
    ignore[2, :] = True
    row = {"mask_rle": encode_mask(target), "ignore_rle": encode_mask(ignore), "height": 5, "width": 5}
    out = decode_target(row)
    assert out.dtype == np.uint8
    assert (out[2] == 255).all()
    assert out[1, 1] == 1 and out[0, 0] == 0
    assert set(np.unique(decode_target({**row, "ignore_rle": None}))) == {0, 1}
    table = pa.table(
        {
            "dataset": ["d"], "task": ["semantic"], "split": ["train"], "image_id": ["i"], "image_path": ["/x.jpg"],
            "query_id": [0], "text": ["t"], "is_sentence": [False], "height": [5], "width": [5],
            "mask_rle": [row["mask_rle"]], "ignore_rle": [row["ignore_rle"]], "source_id": [None],
        },
        schema=MANIFEST_SCHEMA,
    )  # fmt: skip
    np.testing.assert_array_equal(decode_target(table, 0), out)
    with pytest.raises(IndexError):
        decode_target(table, 1)


def test_an_empty_mask_of_a_large_image_is_never_rasterised() -> None:
    """Issue 11: an empty segmentation was encoded by rasterising a full-size zero mask (3.9 GiB at 65000^2)."""
    import tracemalloc

    tracemalloc.start()
    try:
        counts = coco_segmentation_to_rle([], 16000, 16000)
        union = union_rle([], 16000, 16000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # a full uint8 mask would be 256 MB
    assert counts == union and rle_area(counts, 16000, 16000) == 0
    assert coco_segmentation_to_rle([], 40, 50) == encode_mask(np.zeros((40, 50), dtype=bool))  # same bytes as before
