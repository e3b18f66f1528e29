"""Live images in bounded memory: decoded once, kept at most WORKING_SIDE px, the mask back at full size.

Issue 24 row 1 (a 13000x13000 PNG took 20.9 GB): the reader no longer copies what it was handed, refuses
a side above LENS_MAX_IMAGE_SIDE on the header, and the stripe-wise upsampling equals torch's bilinear.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lens_cache.images import ImageReadError, opened_image, read_rgb, working_image
from PIL import Image

from lens_train.inference.large_images import fit_mask, upsampled_mask


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with edges (so a downscale is not trivially flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x + y) % 64) * 4], axis=-1)
    noise = rng.integers(0, 20, size=(h, w, 3))
    return (base + noise).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("size,out", [((37, 53), (300, 211)), ((64, 64), (4096, 4096)), ((17, 9), (40, 1000))])
def test_stripes_equal_torch_bilinear(size, out):
    logits = torch.randn(size, generator=torch.Generator().manual_seed(1)) * 4
    expected = torch.sigmoid(F.interpolate(logits[None, None], size=out, mode="bilinear",
                                           align_corners=False)[0, 0]) > 0.5
    mask = upsampled_mask(logits, out, 0.5, stripe_rows=97)  # several stripes, a ragged last one
    assert mask.shape == out and mask.dtype == bool
    differ = int((mask != expected.numpy()).sum())
    assert differ <= max(1, out[0] * out[1] // 1_000_000)  # float rounding at the threshold only


def test_stripes_follow_the_threshold():
    logits = torch.linspace(-3, 3, 50)[None].repeat(10, 1)
    high = upsampled_mask(logits, (20, 100), 0.9)
    low = upsampled_mask(logits, (20, 100), 0.1)
    assert high.sum() < low.sum() and (high <= low).all()


def test_fit_mask_nearest():
    mask = np.zeros((100, 60), dtype=bool)
    mask[10:50, 20:40] = True
    small = fit_mask(mask, (50, 30))
    assert small.shape == (50, 30) and small[5:25, 10:20].all() and small.sum() == 20 * 10
    assert fit_mask(mask, (100, 60)) is mask


def test_an_image_that_fits_is_read_as_the_cache_reads_it(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(_photo(90, 120)).save(path)
    image, size = working_image(path, max_side=120)
    assert size == (90, 120)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(read_rgb(path)))


@pytest.mark.parametrize("name", ["big.png", "big.jpg"])
def test_a_larger_image_is_downscaled_once(tmp_path, name):
    path = tmp_path / name
    pixels = _photo(300, 480)
    Image.fromarray(pixels).save(path, **({"quality": 95} if name.endswith("jpg") else {}))
    image, size = working_image(path, max_side=64)
    assert size == (300, 480) and image.mode == "RGB" and image.size == (64, 40)
    reference = np.asarray(Image.fromarray(pixels).resize((64, 40), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - reference).mean() < 6  # the same picture, smaller


def test_a_rotated_photo_keeps_its_displayed_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "r.jpg"
    Image.fromarray(_photo(200, 100)).save(path, exif=exif)  # stored 100 wide x 200 high, displayed 200 x 100
    image, size = working_image(path, max_side=50)
    assert size == (100, 200) and image.size == (50, 25)


def test_a_handed_image_is_not_copied_twice():
    """A PIL image without an orientation tag is used as it is: one conversion, no exif_transpose copy."""
    from lens_cache.images import _upright

    source = Image.fromarray(_photo(30, 40))
    assert _upright(source) is source
    image, size = working_image(source)
    assert size == (30, 40) and image is not source
    np.testing.assert_array_equal(np.asarray(image), np.asarray(source))


def test_sixteen_bit_large_image_is_scaled_not_clipped(tmp_path):
    values = (np.arange(200 * 300, dtype=np.uint32).reshape(200, 300) * 3 % 65536).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image, _ = working_image(path, max_side=60)
    assert (np.asarray(image) == 255).mean() < 0.1  # a clipped conversion turns most of it white


def test_a_side_above_the_limit_is_refused_on_the_header(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.fromarray(_photo(10, 70)).save(path)
    monkeypatch.setenv("LENS_MAX_IMAGE_SIDE", "64")
    with pytest.raises(ImageReadError, match=r"is 70x10, above the limit of 64 px per side.*LENS_MAX_IMAGE_SIDE"):
        working_image(path)
    with pytest.raises(ImageReadError, match="above the limit"):
        working_image(Image.fromarray(_photo(10, 70)))


def test_pils_pixel_limit_gives_way_to_the_side_limit(tmp_path, monkeypatch):
    """PIL refuses images above 2 x MAX_IMAGE_PIXELS (179 Mpx: a 16384 x 16384 image); the readers apply
    LENS_MAX_IMAGE_SIDE instead, and PIL's setting is left as it was."""
    path = tmp_path / "a.png"
    Image.fromarray(_photo(40, 50)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with opened_image(path) as image:
        assert image.size == (50, 40)
    assert working_image(path)[1] == (40, 50)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_segmenting_a_large_image_gives_the_mask_at_its_size(tmp_path, monkeypatch):
    """The toy head on an image larger than the working side (here 64 px): the backbones see the downscaled image,
    the mask comes back at the original size (the working logits upsampled), pictures and summary agree."""
    import lens_cache.images as images

    from lens_train import Segmenter
    from lens_train.inference.result import write_result

    seg = Segmenter.from_pretrained("toy", device="cpu")
    scene = tmp_path / "scene.png"
    Image.fromarray(_photo(150, 240)).save(scene)
    monkeypatch.setattr(images, "WORKING_SIDE", 64)
    result = seg(scene, "the red circle")
    assert result.image.size == (64, 40) and tuple(result.logits.shape) == (40, 64)
    assert result.mask.shape == (150, 240) and result.full_size == (150, 240)
    expected = upsampled_mask(result.logits, (150, 240), result.threshold)
    assert (result.mask == expected).all()
    # the same pixels handed in as the working image: the same logits, and its original size travels with it
    small = seg(seg_image := images.working_image(scene)[0], "the red circle")
    assert seg_image.info[images.ORIGINAL_SIZE_INFO] == (150, 240) and small.mask.shape == (150, 240)
    torch.testing.assert_close(small.logits, result.logits)
    paths = write_result(tmp_path / "out", result)
    assert Image.open(paths["mask"]).size == (240, 150) and Image.open(paths["overlay"]).size == (64, 40)
    summary = result.summary()
    assert summary["original_size"] == [150, 240] and summary["mask_pixels"] == int(result.mask.sum())
