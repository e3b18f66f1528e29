"""Reading an image file: the one way the cache builder, ``lens-segment`` and ``lens-eval`` do it.

A live result must equal the cached one, so the pixels a backbone sees must not depend on
which path read the file:

* sources: a local path (``~`` expanded) or any fsspec URL (``s3://...``); a PIL image
  handed in is used as it is;
* pixels as displayed: the EXIF orientation tag is applied (PIL's ``exif_transpose``), as
  LISA's ``cv2.imread`` applies it and as LabelMe applied it when ReasonSeg's polygons were
  drawn, so a rotated photo is upright and matches its annotations. A dataset whose
  annotations are in the stored frame of a photo rotated by 90 degrees (a COCO image with
  an orientation tag) then disagrees in size with its manifest and the builder skips the
  image as ``size_mismatch`` (:func:`lens_manifests.common.displayed_size` gives the size checked, from the header);
* any PIL mode (palette, grayscale, RGBA, CMYK) becomes RGB with PIL's ``convert("RGB")`` (alpha is
  dropped, not composited); 16-bit grayscale (``I;16*``, or ``I`` holding values above 255) is first scaled to
  8 bits by dropping the low byte, as OpenCV's ``imread`` does for display (PIL's own conversion clips it,
  turning most of a 16-bit picture white);
* a file that is not there is :class:`ImageReadError` with reason ``missing``; one PIL
  cannot open or decode (truncated, not an image) is the same type with reason
  ``unreadable``. The message is one line naming the file.

:func:`opened_image` reads the header only, so the builder checks an image's size before
paying for its pixels; :func:`decoded_rgb` then decodes it. :func:`read_rgb` does both.

Live inputs (``lens-segment``, the Python API, the web demo) come from people, so their memory is
bounded: :func:`working_image` refuses an image above ``LENS_MAX_IMAGE_SIDE`` (16384 px per side by
default) on its header, decodes it once (a JPEG at a reduced scale when that suffices) and keeps it at
most :data:`WORKING_SIDE` px on its longest side. The backbones see 336 px (CLIP) and 1024 px (SAM),
so nothing they compute needs more; the mask is brought back to the original size at the end
(``lens_train.inference.large_images``). An image up to :data:`WORKING_SIDE` is used exactly as
:func:`read_rgb` reads it, so a live result equals the cached one; a larger one is downscaled first
(the cache builder never does: dataset images keep their size, and their masks are stored at it).
PIL's own decompression-bomb limit (about 179 megapixels) is replaced by the per-side limit, so an
image the manifests accept (up to 16384x16384) opens everywhere.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
from PIL import Image, ImageOps

from lens_cache.errors import UsageError

#: :attr:`ImageReadError.reason` of a file that is not there
MISSING = "missing"
#: :attr:`ImageReadError.reason` of a file PIL cannot open or decode
UNREADABLE = "unreadable"
#: The EXIF tag of the orientation (1 = upright).
ORIENTATION_TAG = 0x0112
#: Longest side, in pixels, of the image the live path works on (see the module docstring).
WORKING_SIDE = 4096
#: ``Image.info`` key of a downscaled working image: the (H, W) of the image it was made from.
ORIGINAL_SIZE_INFO = "lens_original_size"

# PIL's decompression-bomb limit is a process-wide setting; it is lifted only while a header is read.
_OPEN_LOCK = threading.Lock()


class ImageReadError(UsageError):
    """An image cannot be read; ``reason`` is :data:`MISSING` or :data:`UNREADABLE` (the message: one line).

    A UserError (the CLIs print it as one line) and, as a bad argument, a ValueError (``lens-chat``'s
    ``/image`` reports it and goes on).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _upright(image: Image.Image) -> Image.Image:
    """``image`` with its EXIF orientation applied; itself (not a copy) when it has none."""
    if image.getexif().get(ORIENTATION_TAG, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)



def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of any mode, 16-bit grayscale scaled to 8 bits (the module docstring)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np

        values = np.asarray(image)
        if image.mode.startswith("I;16") or int(values.max(initial=0)) > 255:
            values = np.right_shift(values.astype(np.int64).clip(0, 65535), 8)
        return Image.fromarray(values.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def _local(source: str | Path) -> Path | None:
    """The local path of ``source``, or None for an fsspec URL."""
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        return None
    return Path(text.removeprefix("file://")).expanduser()


def _unreadable(source: str | Path, error: Exception) -> ImageReadError:
    return ImageReadError(f"cannot read image {source}: {type(error).__name__}: {error}", reason=UNREADABLE)


@contextlib.contextmanager
def opened_image(source: str | Path) -> Iterator[Image.Image]:
    """The image at ``source``, opened lazily (header read, pixels not decoded); closed on exit.

    Raises:
        ImageReadError: missing, or its header is not an image PIL reads.
    """
    local = _local(source)
    with contextlib.ExitStack() as stack:
        try:
            if local is None:
                file = stack.enter_context(fsspec.open(str(source), "rb"))
                image = stack.enter_context(_open_unbounded(file))
            else:  # a plain path keeps PIL's messages readable ("cannot identify image file '/x.jpg'")
                image = stack.enter_context(_open_unbounded(local))
        except FileNotFoundError:
            raise ImageReadError(f"image not found: {source}", reason=MISSING) from None
        except Exception as error:  # PIL raises many types for a broken file (OSError, SyntaxError, ...)
            raise _unreadable(source, error) from None
        yield image


def _open_unbounded(file) -> Image.Image:
    """``Image.open`` without PIL's pixel-count limit: callers apply the per-side limit instead."""
    with _OPEN_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(file)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decoded_rgb(image: Image.Image, source: str | Path) -> Image.Image:
    """The pixels of an opened image as an RGB image, as displayed (decoded now, independent of the file).

    Args:
        image: from :func:`opened_image`.
        source: its path or URL, for the message.
    Raises:
        ImageReadError: the pixels do not decode (reason ``unreadable``).
    """
    try:
        image.load()
        return _to_rgb(_upright(image))
    except Exception as error:  # a truncated or corrupt body: OSError, SyntaxError, ValueError, ...
        raise _unreadable(source, error) from None


def read_rgb(source: str | Path | Image.Image) -> Image.Image:
    """The RGB image at ``source`` (a path or URL), or a PIL image converted to RGB.

    Returns:
        RGB PIL image, upright (EXIF orientation applied), size (W, H) as displayed.
    Raises:
        ImageReadError: missing, unreadable (see the module docstring), or a side above
            ``LENS_MAX_IMAGE_SIDE`` (on the header, before decoding).
    """
    if isinstance(source, Image.Image):
        check_side(displayed_size_of(source), "given")
        return _to_rgb(_upright(source))
    with opened_image(source) as image:
        check_side(displayed_size_of(image), source)  # on the header: PIL's pixel-count limit is lifted
        return decoded_rgb(image, source)


def displayed_size_of(image: Image.Image) -> tuple[int, int]:
    """(H, W) of ``image`` as displayed (its EXIF orientation applied), from the header: the manifests' rule
    (:func:`lens_manifests.common.displayed_size`; an orientation that cannot be read counts as none)."""
    from lens_manifests.common import displayed_size

    return displayed_size(image)


def check_side(size: tuple[int, int], source: object) -> None:
    """Refuse (ImageReadError, one line) an image with a side above ``LENS_MAX_IMAGE_SIDE``."""
    from lens_manifests.common import MAX_IMAGE_SIDE_ENV, max_image_side

    limit = max_image_side()
    h, w = size
    if max(h, w) > limit:
        raise ImageReadError(f"image {source} is {w}x{h}, above the limit of {limit} px per side: downscale it "
                             f"(or set {MAX_IMAGE_SIDE_ENV} to allow it)", reason=UNREADABLE)


def _working_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) scaled so the longest side is ``max_side`` (``size`` itself when it fits)."""
    h, w = size
    scale = max_side / max(h, w)
    if scale >= 1:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def _shrunk(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` (upright) resized to (h, w) when that is smaller, as RGB; modes a resize keeps are
    resized before the conversion, so no full-size RGB copy is made."""
    if (image.height, image.width) == size:
        return _to_rgb(image)
    if image.mode not in ("RGB", "L", "RGBA", "LA", "I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_rgb(image)  # palette, 1-bit, CMYK: no meaningful resize before the conversion
    if image.mode in ("I;16", "I;16B", "I;16L"):
        image = _to_rgb(image)  # 8 bits first (resizing I;16 is not supported for every filter)
    small = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _to_rgb(small)


def original_size_of(image: Image.Image) -> tuple[int, int]:
    """(H, W) of the image ``image`` stands for: its own size, or the original's for a downscaled working image."""
    size = image.info.get(ORIGINAL_SIZE_INFO)
    return (int(size[0]), int(size[1])) if size is not None else (image.height, image.width)


def _marked(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` carrying the original's (H, W) when it is smaller than it (:func:`original_size_of`)."""
    if size != (image.height, image.width):
        image.info[ORIGINAL_SIZE_INFO] = size
    return image


def working_image(source: str | Path | Image.Image, *, max_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The RGB image the live path works on, and the original (H, W) as displayed.

    Decoded once; at most ``max_side`` px on its longest side (see the module docstring); a downscaled
    one carries the original's size (:func:`original_size_of`), so handing it back in keeps it. An image
    that already fits comes out exactly as :func:`read_rgb` reads it.

    Raises:
        ImageReadError: missing, unreadable, or above ``LENS_MAX_IMAGE_SIDE`` (checked on the header,
            before any pixel is decoded).
    """
    max_side = WORKING_SIDE if max_side is None else max_side
    if isinstance(source, Image.Image):
        if ORIGINAL_SIZE_INFO in source.info:  # a working image already
            size = original_size_of(source)
            return _marked(_to_rgb(source), size), size
        size = displayed_size_of(source)
        check_side(size, "given")
        target = _working_size(size, max_side)
        if target == size:
            return _to_rgb(_upright(source)), size
        return _marked(_shrunk(_upright(source), target), size), size
    with opened_image(source) as image:
        size = displayed_size_of(image)
        check_side(size, source)
        target = _working_size(size, max_side)
        if target == size:
            return decoded_rgb(image, source), size
        try:
            if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, never below the target
                sideways = (image.width, image.height) != (size[1], size[0])
                image.draft("RGB", (target[0], target[1]) if sideways else (target[1], target[0]))
            image.load()
            return _marked(_shrunk(_upright(image), target), size), size
        except ImageReadError:
            raise
        except Exception as error:  # a truncated or corrupt body
            raise _unreadable(source, error) from None
