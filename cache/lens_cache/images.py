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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import fsspec
from PIL import Image, ImageOps

from lens_cache.errors import UsageError

#: :attr:`ImageReadError.reason` of a file that is not there
MISSING = "missing"
#: :attr:`ImageReadError.reason` of a file PIL cannot open or decode
UNREADABLE = "unreadable"


class ImageReadError(UsageError):
    """An image cannot be read; ``reason`` is :data:`MISSING` or :data:`UNREADABLE` (the message: one line).

    A UserError (the CLIs print it as one line) and, as a bad argument, a ValueError (``lens-chat``'s
    ``/image`` reports it and goes on).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _upright(image: Image.Image) -> Image.Image:
    """``image`` with its EXIF orientation applied (itself when it has none)."""
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
                image = stack.enter_context(Image.open(file))
            else:  # a plain path keeps PIL's messages readable ("cannot identify image file '/x.jpg'")
                image = stack.enter_context(Image.open(local))
        except FileNotFoundError:
            raise ImageReadError(f"image not found: {source}", reason=MISSING) from None
        except Exception as error:  # PIL raises many types for a broken file (OSError, SyntaxError, ...)
            raise _unreadable(source, error) from None
        yield image


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
        ImageReadError: missing or unreadable (see the module docstring).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(_upright(source))
    with opened_image(source) as image:
        return decoded_rgb(image, source)
