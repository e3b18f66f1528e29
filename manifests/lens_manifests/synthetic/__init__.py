"""The project's own dataset: coloured shapes, written in the real dataset formats.

:func:`write_synthetic` draws images of 2-5 shapes (circle, square, triangle,
star, hexagon; red, green, blue, yellow, purple, orange; small or big) on a
noisy, textured background and writes three sets that the *real* adapters read:

* ``reason_seg/ReasonSeg/{train,val,test}/NAME.jpg + NAME.json`` -- one query per
  image with 2-3 phrasings: reasoning sentences ("the shape that has three
  corners", "the object with the same colour as a ripe banana", "the largest
  shape in the picture") or short phrases (``is_sentence`` False, e.g. "the
  red circle", "the blue shapes"). Near-ties (e.g. a second shape almost as
  large) are marked ``ignore``; a few meaningless ``flag`` shapes are added,
  as in the real ReasonSeg files.
* ``refer_seg/synthref/refs(unc).p + instances.json`` with images in
  ``refer_seg/images/synthref/`` -- every shape that some phrase picks out
  uniquely is a ref with 1-3 sentences ("the red circle", "the big blue
  square on the left", "the leftmost shape"); splits train/val/testA/testB.
* ``ade20k/images/{training,validation,testing}/*.jpg`` + ``ade20k/annotations/...png``
  -- ADE20K-format label maps over :data:`SYNTHETIC_CLASSES` (value ``i + 1`` is
  class ``i``; value 0, the 1-pixel rim around each shape, is ignored), with the
  class list in ``ade20k/synthetic_classes.json``.

Masks are exact: each shape's polygon is rasterised first (with the rule its
format's reader uses: OpenCV-style for ReasonSeg/ADE, pycocotools for REFER)
and the image is painted through that mask. Everything is a pure function of
the seed and the counts; every image has its own generator, seeded from
``(seed, set, split, index)``.

The modules, by concept:

* :mod:`.scenes` -- shapes, backgrounds and masks (:func:`make_scene`);
* :mod:`.language` -- the phrases that pick shapes out (:func:`reason_candidates`, :func:`refer_sentences`);
* :mod:`.render` -- one image and its annotation in each format, and the rendering over processes;
* :mod:`.publish` -- :func:`write_synthetic`: REFER's index, the marker, the atomic rename into place.
"""

from .language import (
    COLOUR_CLUES,
    EXTREME_PHRASES,
    KIND_CLUES,
    ReasonQuery,
    reason_candidates,
    refer_sentences,
)
from .publish import (
    DEFAULT_NUM_TEST,
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    GENERATOR_VERSION,
    MARKER,
    _publish,
    read_marker,
    write_synthetic,
)
from .render import JPEG_QUALITY, REFER_NAME, _item_rng
from .scenes import COLOURS, SHAPE_KINDS, SYNTHETIC_CLASSES, Scene, Shape, make_scene, shape_polygon

__all__ = [
    "COLOURS",
    "COLOUR_CLUES",
    "DEFAULT_NUM_TEST",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "EXTREME_PHRASES",
    "GENERATOR_VERSION",
    "JPEG_QUALITY",
    "KIND_CLUES",
    "MARKER",
    "REFER_NAME",
    "SHAPE_KINDS",
    "SYNTHETIC_CLASSES",
    "ReasonQuery",
    "Scene",
    "Shape",
    "make_scene",
    "read_marker",
    "reason_candidates",
    "refer_sentences",
    "shape_polygon",
    "write_synthetic",
]
