"""Published sizes of the dataset splits: images and queries of a split before its data is downloaded.

``lens-cache estimate`` (:mod:`lens_cache.estimate`) plans a build from these figures when the data is not
at hand; with the data it counts the manifest instead (:func:`lens_manifests.build_manifest`), which is the
truth: the figures below are the datasets' papers', and a manifest differs from them by the few items an
adapter skips (an empty REFER sentence, an unreadable image).

What a *query* is follows this project's adapters (one manifest row each):

- REFER sets (:mod:`.refer`): one query per referring expression (sentence) of the split; the images are
  those the split's expressions refer to. Figures of the UNC splits (RefCOCO, RefCOCO+: Yu et al., "Modeling
  Context in Referring Expressions", ECCV 2016, table of dataset statistics) and of the UMD split of
  RefCOCOg (Nagaraja et al., "Modeling Context Between Objects for Referring Expression Understanding",
  ECCV 2016). Totals: RefCOCO 19,994 images and 142,209 expressions (the per-split sum is 142,210, as printed),
  RefCOCO+ 19,992 and 141,564, RefCOCOg (umd) 25,799 and 95,010.
- ReasonSeg (:mod:`.reasonseg`; Lai et al., "LISA: Reasoning Segmentation via Large Language Model",
  CVPR 2024: 1,218 images, train 239, val 200, test 779): val and test give one query per image (``text[0]``,
  what LISA evaluates), so their queries are the images (the adapter's rule); train gives one query per
  phrasing of an image, and how many phrasings the release holds is not published: no query count.
- Semantic sets (:mod:`.semantic`): up to ``MAX_CLASSES_PER_IMAGE`` (3, LISA's ``num_classes_per_sample``)
  queries per image, one per sampled class present; the queries are that upper bound (an image with fewer
  classes gives fewer). Images: ADE20K SceneParsing (Zhou et al., CVPR 2017: 20,210 train, 2,000 val),
  COCO-Stuff (Caesar et al., CVPR 2018: labels every COCO 2017 image, train2017 118,287, val2017 5,000),
  Mapillary Vistas (Neuhold et al., ICCV 2017: 18,000 training, 2,000 validation).

Left out on purpose (not known reliably here: :func:`published_count` says so, and the estimate asks for
``--data-root``): refclef's per-split figures (ReferItGame as a whole: 19,894 images, 130,525 expressions,
Kazemzadeh et al. 2014; its UNC split sizes are not recalled reliably), PACO-LVIS and PASCAL-Part (the
VLPart files LISA reads), ReasonSeg train's queries, and the synthetic sets (generated: always counted).

The mean words of a query's text (what its question's length, hence its bytes in the store, follows) are
given where published (REFER: Yu et al. 2016, whole datasets) or derived from this project's class lists
(ADE20K, COCO-Stuff: :mod:`.classes`); elsewhere None (the estimate then states the length it assumes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .classes import ADE20K_CLASSES, COCOSTUFF_CLASSES
from .registry import parse_spec
from .semantic import MAX_CLASSES_PER_IMAGE

#: How a count was obtained (``PublishedCount.queries_from``).
PUBLISHED = "published"
ONE_PER_IMAGE = "one per image (the adapter's rule)"
UP_TO_CLASSES = f"up to {MAX_CLASSES_PER_IMAGE} per image (the adapter's rule: an upper bound)"


@dataclass(frozen=True)
class PublishedCount:
    """The published size of one split.

    Attributes:
        images: images of the split.
        queries: manifest rows it gives, or None where no figure is known (then the manifest is needed).
        queries_from: how ``queries`` follows from the figures (:data:`PUBLISHED`, :data:`ONE_PER_IMAGE`,
            :data:`UP_TO_CLASSES`).
        source: the paper the figures are from.
        mean_words: mean words of a query's text, or None where not known.
        words_from: where ``mean_words`` is from.
        task: the manifest's task of its rows (``referring``, ``reasoning``, ``semantic``).
    """

    images: int
    queries: int | None
    queries_from: str
    source: str
    mean_words: float | None
    words_from: str
    task: str


def _mean_words(names: tuple[str, ...]) -> float:
    return round(sum(len(name.split()) for name in names) / len(names), 2)


_YU = "Yu et al., ECCV 2016 (UNC splits)"
_UMD = "Nagaraja et al., ECCV 2016 (UMD split)"
_LISA = "Lai et al., LISA, CVPR 2024"
_WORDS_YU = "Yu et al., ECCV 2016 (whole dataset)"
#: LISA drops every COCO-Stuff class with "-" in its name (see :mod:`.semantic`).
_COCOSTUFF_USED = tuple(name for name in COCOSTUFF_CLASSES if "-" not in name)


def _refer(images: int, queries: int, source: str, words: float) -> PublishedCount:
    return PublishedCount(images, queries, PUBLISHED, source, words, _WORDS_YU, "referring")


def _semantic(images: int, source: str, words: float | None, words_from: str) -> PublishedCount:
    return PublishedCount(images, images * MAX_CLASSES_PER_IMAGE, UP_TO_CLASSES, source, words, words_from,
                          "semantic")


#: ``name:split`` -> its published size (see the module docstring for every figure's source).
PUBLISHED_COUNTS: dict[str, PublishedCount] = {
    "refcoco:train": _refer(16_994, 120_624, _YU, 3.61),
    "refcoco:val": _refer(1_500, 10_834, _YU, 3.61),
    "refcoco:testA": _refer(750, 5_657, _YU, 3.61),
    "refcoco:testB": _refer(750, 5_095, _YU, 3.61),
    "refcoco+:train": _refer(16_992, 120_191, _YU, 3.53),
    "refcoco+:val": _refer(1_500, 10_758, _YU, 3.53),
    "refcoco+:testA": _refer(750, 5_726, _YU, 3.53),
    "refcoco+:testB": _refer(750, 4_889, _YU, 3.53),
    "refcocog:train": _refer(21_899, 80_512, _UMD, 8.43),
    "refcocog:val": _refer(1_300, 4_896, _UMD, 8.43),
    "refcocog:test": _refer(2_600, 9_602, _UMD, 8.43),
    "reasonseg:val": PublishedCount(200, 200, ONE_PER_IMAGE, _LISA, None, "", "reasoning"),
    "reasonseg:test": PublishedCount(779, 779, ONE_PER_IMAGE, _LISA, None, "", "reasoning"),
    "ade20k:train": _semantic(20_210, "Zhou et al., CVPR 2017", _mean_words(ADE20K_CLASSES), "ADE20K's 150 class names"),
    "ade20k:val": _semantic(2_000, "Zhou et al., CVPR 2017", _mean_words(ADE20K_CLASSES), "ADE20K's 150 class names"),
    "cocostuff:train": _semantic(118_287, "COCO 2017 train; Caesar et al., CVPR 2018",
                                 _mean_words(_COCOSTUFF_USED), "COCO-Stuff's class names LISA uses"),
    "cocostuff:val": _semantic(5_000, "COCO 2017 val; Caesar et al., CVPR 2018",
                               _mean_words(_COCOSTUFF_USED), "COCO-Stuff's class names LISA uses"),
    "mapillary:train": _semantic(18_000, "Neuhold et al., ICCV 2017", None, ""),
    "mapillary:val": _semantic(2_000, "Neuhold et al., ICCV 2017", None, ""),
}

#: Splits known to have no reliable published figure here, and why (the estimate names the reason).
NOT_PUBLISHED: dict[str, str] = {
    "reasonseg:train": "239 images (Lai et al., CVPR 2024), but its queries (one per phrasing) are not published",
    "refclef": "only ReferItGame's totals are published here (19,894 images, 130,525 expressions), not its UNC splits",
    "paco_lvis": "no per-split figures are recorded here for the PACO-LVIS files LISA reads",
    "pascal_part": "no per-split figures are recorded here for the PASCAL-Part files LISA reads",
    "synthetic": "a synthetic set is generated, never published: its manifest is always counted",
}


def published_count(spec: str) -> tuple[PublishedCount | None, str]:
    """(the published size of ``spec``, "") or (None, why there is none).

    Raises:
        ManifestError: an unknown dataset or split (:func:`lens_manifests.parse_spec`).
    """
    name, split = parse_spec(spec)
    key = f"{name}:{split}"
    if key in PUBLISHED_COUNTS:
        return PUBLISHED_COUNTS[key], ""
    why = NOT_PUBLISHED.get(key) or NOT_PUBLISHED.get(name) or NOT_PUBLISHED.get(name.split("-")[0])
    return None, why or f"no published figures are recorded for {key}"
