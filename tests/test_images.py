"""One image reader: the cache builder, lens-segment and lens-eval's figures see the same pixels and errors."""

from __future__ import annotations

import re

import fsspec
import numpy as np
import pytest
from lens_cache.block_job import FAILURE_CODES, load_image as build_load
from lens_cache.images import ImageReadError, read_rgb
from PIL import Image

from lens_train.evaluation.evaluate import _load_image as eval_load
from lens_train.inference.segmenter import load_image as segment_load

H, W = 12, 20


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _palette(path):
    colours = np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30], [0, 0, 0]], dtype=np.uint8)
    index = np.random.default_rng(1).integers(0, len(colours), size=(H, W)).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(colours.reshape(-1).tolist() + [0] * (768 - colours.size))
    image.save(path)
    return colours[index]


def _grayscale(path):
    gray = _pixels(2)[..., 0]
    Image.fromarray(gray, mode="L").save(path)
    return np.repeat(gray[..., None], 3, axis=2)


def _exif_rotated_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": every reader shows it upright
    Image.fromarray(_pixels(3)).save(path, quality=95, exif=exif)
    with Image.open(path) as stored:
        assert stored.getexif().get(0x0112) == 6
        return np.rot90(np.asarray(stored.convert("RGB")), k=-1)  # clockwise, computed here without PIL


def _rgba(path):
    pixels = np.concatenate([_pixels(4), np.full((H, W, 1), 7, dtype=np.uint8)], axis=2)
    Image.fromarray(pixels, mode="RGBA").save(path)
    return pixels[..., :3]  # alpha dropped, not composited


WRITERS = {"palette.png": _palette, "gray.png": _grayscale, "rotated.jpg": _exif_rotated_jpeg, "rgba.png": _rgba}


@pytest.mark.parametrize("name", list(WRITERS))
def test_build_segment_and_eval_see_the_same_rgb_pixels(tmp_path, name):
    path = tmp_path / name
    expected = WRITERS[name](path)
    size = expected.shape[:2]  # the manifest's (h, w): as displayed ((W, H) for the rotated photo)
    built = build_load(str(path), size)
    assert built.code == 0, built.message
    cached = np.asarray(built.image)
    assert cached.dtype == np.uint8 and cached.shape == (*size, 3)
    np.testing.assert_array_equal(cached, expected)
    np.testing.assert_array_equal(np.asarray(segment_load(str(path))), cached)
    np.testing.assert_array_equal(np.asarray(segment_load(path)), cached)
    np.testing.assert_array_equal(eval_load(str(path)), cached)
    with Image.open(path) as opened:  # a PIL image handed in: converted the same way
        np.testing.assert_array_equal(np.asarray(segment_load(opened)), cached)


def test_a_rotated_photo_annotated_in_its_stored_frame_is_skipped_as_mis_sized(tmp_path):
    """A manifest size in the stored frame of a photo rotated by 90 degrees (LabelMe and LISA see it upright)
    cannot match the pixels the model sees: the builder skips it, naming both sizes."""
    path = tmp_path / "rotated.jpg"
    _exif_rotated_jpeg(path)
    built = build_load(str(path), (H, W))
    assert (built.image, built.code) == (None, 3)
    assert built.message == f"size_mismatch: image is {W}x{H}, manifest says {H}x{W}"


def _corrupt(path):
    path.write_bytes(b"this is not a png" * 8)


def _truncated(path):
    Image.fromarray(_pixels(5)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not decode


@pytest.mark.parametrize(("damage", "reason"), [(_corrupt, "unreadable"), (_truncated, "unreadable"), (None, "missing")])
def test_a_bad_file_is_one_error_type_with_one_message(tmp_path, damage, reason):
    path = tmp_path / "bad.png"
    if damage is not None:
        damage(path)
    with pytest.raises(ImageReadError) as live:
        segment_load(str(path))
    message = str(live.value)
    assert live.value.reason == reason and "\n" not in message and str(path) in message
    assert message.startswith("image not found: " if reason == "missing" else f"cannot read image {path}: ")
    built = build_load(str(path), (H, W))
    assert (built.image, built.code, built.message) == (None, FAILURE_CODES[reason], f"{reason}: {message}")
    assert eval_load(str(path)) is None
    with pytest.raises(ImageReadError, match="^" + re.escape(message) + "$"):
        read_rgb(path)


def test_urls_read_like_paths(tmp_path):
    path = tmp_path / "gray.png"
    expected = _grayscale(path)
    np.testing.assert_array_equal(np.asarray(read_rgb(f"file://{path}")), expected)
    memory = "memory://lens-images-test/gray.png"
    with fsspec.open(memory, "wb") as file:
        file.write(path.read_bytes())
    np.testing.assert_array_equal(np.asarray(read_rgb(memory)), expected)
    assert build_load(memory, (H, W)).code == 0
    with pytest.raises(ImageReadError, match="image not found"):
        read_rgb("memory://lens-images-test/none.png")


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_a_16_bit_grayscale_picture_reads_as_its_8_bit_version(tmp_path, mode):
    """Issue 24 row 6: a 16-bit PNG is scaled to 8 bits (the high byte, as OpenCV's imread shows it), not
    clipped to white by PIL's convert("RGB")."""
    import numpy as np

    eight = np.random.default_rng(0).integers(0, 256, size=(20, 30), dtype=np.uint16)
    sixteen = eight * 256 + np.random.default_rng(1).integers(0, 256, size=eight.shape, dtype=np.uint16)  # any low byte
    path16, path8 = tmp_path / "sixteen.png", tmp_path / "eight.png"
    Image.fromarray(sixteen.astype(np.uint16)).save(path16)  # PIL writes a 16-bit grayscale PNG
    Image.fromarray(eight.astype(np.uint8), "L").save(path8)
    opened = Image.open(path16)
    if mode == "I":
        opened = opened.convert("I")  # the 32-bit integer mode some readers hand over
    assert opened.mode == mode
    expected = np.asarray(read_rgb(path8))
    assert np.array_equal(np.asarray(read_rgb(opened)), expected)
    if mode == "I;16":
        assert np.array_equal(np.asarray(read_rgb(path16)), expected)
        assert (np.asarray(opened.convert("RGB")) == 255).mean() > 0.5  # what PIL alone would give
