"""REFER adapter (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF) in the REFER API layout.

Layout under ``<data_root>/refer_seg/``::

    <name>/refs(<splitBy>).p       pickle: list of refs {ref_id, ann_id, image_id, split,
                                    sentences: [{sent, sent_id, ...}], ...}
    <name>/instances.json          COCO: images {id, file_name, height, width},
                                    annotations {id, segmentation, ...}
    images/mscoco/images/train2014/<file_name>   (refcoco, refcoco+, refcocog)
    images/saiapr_tc-12/<file_name>              (refclef; also found at SAIAPR's own
                                                  <NN>/images/<file_name>)

``splitBy`` is ``unc`` for refcoco/refcoco+/refclef and ``umd`` for refcocog
(LISA's choice). Every sentence of every ref in the split is one query
(task ``referring``, ``is_sentence`` False); its target is the ref's
annotation (all polygon/RLE parts merged). Split selection follows the REFER
API: ``train``/``val`` match exactly, ``test`` matches every ``test*`` split,
``testA``/``testB``/``testC`` match the test splits containing that letter.
The pickle is read with :mod:`.safe_pickle`; a truncated or damaged one is a
one-line :class:`ManifestError`. Sizes come from ``instances.json``; where the image
is there its header (never its pixels) is read to check them, and a size above
``LENS_MAX_IMAGE_SIDE`` skips the image (see :mod:`.common`). A ``file_name`` that is
absolute or climbs out of the image folder is skipped and listed, never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .common import (
    ManifestError,
    QueryRow,
    Skipped,
    UnsafePathError,
    absolute,
    declared_size_problem,
    path_inside,
    require_path,
    rows_to_table,
)
from .rle import coco_segmentation_to_rle
from .safe_pickle import BrokenPickleError, UnsafePickleError, safe_load


@dataclass(frozen=True, slots=True)
class ReferSource:
    """Where a REFER dataset keeps its refs and images, and its splits."""

    split_by: str
    image_subdir: str  # relative to <data_root>/refer_seg
    splits: tuple[str, ...]


_COCO_IMAGES = "images/mscoco/images/train2014"

REFER_DATASETS: dict[str, ReferSource] = {
    "refcoco": ReferSource("unc", _COCO_IMAGES, ("train", "val", "testA", "testB")),
    "refcoco+": ReferSource("unc", _COCO_IMAGES, ("train", "val", "testA", "testB")),
    "refcocog": ReferSource("umd", _COCO_IMAGES, ("train", "val", "test")),
    "refclef": ReferSource("unc", "images/saiapr_tc-12", ("train", "val", "testA", "testB", "testC")),
}


#: splits the REFER API's ``getRefIds`` understands (others must name a split exactly)
REFER_API_SPLITS = ("train", "val", "test", "testA", "testB", "testC")


def ref_in_split(ref_split: str, split: str) -> bool:
    """Whether a ref labelled ``ref_split`` belongs to the requested ``split`` (REFER's rule)."""
    if split == "test":
        return "test" in ref_split
    if split in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and split[-1] in ref_split[4:]
    return ref_split == split


def _resolve_image(image_dir: Path, file_name: object, *, saiapr: bool) -> Path:
    """``image_dir / file_name`` as LISA and the REFER API join them.

    SAIAPR TC-12 itself stores image ``N`` as ``<N // 1000 as 2 digits>/images/N.jpg``; if
    RefCLEF's ``file_name`` is a bare ``N.jpg`` that is missing at the top level but present
    at that nested place, the nested path is used (a stat per image, never an open).

    Raises:
        UnsafePathError: ``file_name`` is not a path inside ``image_dir``.
    """
    path = path_inside(image_dir, file_name)
    file_name = str(file_name)
    stem = Path(file_name).stem
    if saiapr and "/" not in file_name and stem.isdigit() and not path.exists():
        nested = image_dir / f"{int(stem) // 1000:02d}" / "images" / file_name
        if nested.exists():
            return path_inside(image_dir, f"{int(stem) // 1000:02d}/images/{file_name}")  # a link may lead out
    return path


def _image_sort_key(image_id: Any) -> tuple[int, Any]:
    # numeric ids sort numerically, anything else as text, never mixed
    return (0, image_id) if isinstance(image_id, int) else (1, str(image_id))


def load_refer(
    data_root: str | Path,
    name: str,
    split: str,
    *,
    split_by: str | None = None,
    image_dir: str | Path | None = None,
    dataset: str | None = None,
) -> pa.Table:
    """Manifest of REFER dataset ``name`` (folder ``refer_seg/<name>``), ``split``.

    ``split_by`` and ``image_dir`` default to the known datasets' values
    (:data:`REFER_DATASETS`); any other ``name`` (e.g. the synthetic set) must
    pass both. ``dataset`` names the rows (default: ``name``).
    """
    refer_root = Path(data_root) / "refer_seg"
    split_by, image_dir = _source_of(name, refer_root, split_by=split_by, image_dir=image_dir)
    dataset = dataset or name

    ds_dir = require_path(refer_root / name, dataset, is_dir=True)
    refs_path = require_path(ds_dir / f"refs({split_by}).p", dataset, is_dir=False)
    instances_path = require_path(ds_dir / "instances.json", dataset, is_dir=False)
    require_path(image_dir, f"{dataset} images", is_dir=True)
    selected = _refs_in_split(refs_path, split, dataset)

    with open(instances_path, "rb") as f:
        instances = json.load(f)
    images = {img["id"]: img for img in instances.get("images", [])}
    anns = {ann["id"]: ann for ann in instances.get("annotations", [])}

    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ref in selected:
        by_image.setdefault(ref["image_id"], []).append(ref)

    rows: list[QueryRow] = []
    skipped: list[Skipped] = []
    rle_cache: dict[Any, str] = {}  # one annotation may back several refs
    for image_id in sorted(by_image, key=_image_sort_key):
        img = images.get(image_id)
        if img is None:
            skipped.append(Skipped(f"{refs_path}#image:{image_id}", "image id not in instances.json"))
            continue
        try:
            resolved = _resolve_image(image_dir, img.get("file_name"), saiapr=name == "refclef")
        except UnsafePathError as e:
            skipped.append(Skipped(f"{instances_path}#image:{image_id}", str(e)))
            continue
        problem = declared_size_problem(resolved, img.get("height"), img.get("width"))
        if problem is not None:
            skipped.append(Skipped(str(resolved), problem))
            continue
        source = _ImageSource(dataset=dataset, image_id=image_id, image_path=absolute(resolved),
                              height=int(img["height"]), width=int(img["width"]), refs_path=refs_path,
                              instances_path=instances_path)
        rows += _image_rows(source, by_image[image_id], anns, rle_cache, skipped)
    return rows_to_table(rows, skipped=skipped)


def _source_of(name: str, refer_root: Path, *, split_by: str | None, image_dir: str | Path | None) -> tuple[str, Path]:
    """``split_by`` and ``image_dir`` of REFER dataset ``name``: as given, else the known dataset's.

    Raises:
        ManifestError: one of them is missing for a dataset that is not a known one.
    """
    known = REFER_DATASETS.get(name)
    if split_by is None:
        if known is None:
            raise ManifestError(f"REFER dataset {name!r} is not a known one; pass split_by and image_dir")
        split_by = known.split_by
    if image_dir is None:
        if known is None:
            raise ManifestError(f"REFER dataset {name!r} is not a known one; pass image_dir")
        image_dir = refer_root / known.image_subdir
    return split_by, Path(image_dir)


def _refs_in_split(refs_path: Path, split: str, dataset: str) -> list[dict[str, Any]]:
    """The refs of ``refs_path`` (read with :mod:`.safe_pickle`) that belong to ``split`` (:func:`ref_in_split`).

    Raises:
        ManifestError: the pickle is unsafe, damaged or not a list of refs, or ``split`` is none of the
            REFER API's splits nor one the refs carry.
    """
    try:
        refs = safe_load(refs_path)
    except UnsafePickleError as e:
        raise ManifestError(str(e)) from None
    except BrokenPickleError as e:
        raise ManifestError(f"{e}: download {refs_path.name} again") from None
    if not isinstance(refs, list):
        raise ManifestError(f"{refs_path}: expected a list of refs, found {type(refs).__name__}")
    available = sorted({str(r.get("split", "")) for r in refs})
    selected = [r for r in refs if ref_in_split(str(r.get("split", "")), split)]
    if split not in REFER_API_SPLITS and split not in available:
        raise ManifestError(f"unknown split {split!r} for {dataset}; its refs have splits {', '.join(available)}")
    return selected


@dataclass(frozen=True, slots=True)
class _ImageSource:
    """One image of the manifest, checked, and the files its refs come from (named in skip reasons)."""

    dataset: str
    image_id: Any
    image_path: str
    height: int
    width: int
    refs_path: Path
    instances_path: Path


def _image_rows(source: _ImageSource, refs: list[dict[str, Any]], anns: dict[Any, dict[str, Any]],
                rle_cache: dict[Any, str], skipped: list[Skipped]) -> list[QueryRow]:
    """One row per non-empty sentence of each ref of one image, its target the ref's annotation (its RLE
    computed once, in ``rle_cache``); a ref whose annotation is missing or undecodable goes to ``skipped``."""
    rows: list[QueryRow] = []
    # by split first: an image's rows for one (dataset, split) stay contiguous even under "test"
    for ref in sorted(refs, key=lambda r: (str(r["split"]), r["ref_id"])):
        ann = anns.get(ref["ann_id"])
        if ann is None:
            skipped.append(Skipped(f"{source.refs_path}#ref:{ref['ref_id']}", f"annotation {ref['ann_id']} missing"))
            continue
        if ann["id"] not in rle_cache:
            try:
                rle_cache[ann["id"]] = coco_segmentation_to_rle(ann.get("segmentation", []), source.height,
                                                                source.width)
            except ValueError as e:
                skipped.append(Skipped(f"{source.instances_path}#ann:{ann['id']}", str(e)))
                continue
        for k, sent in enumerate(ref.get("sentences", [])):
            text = str(sent.get("sent", "")).strip()
            if not text:
                continue  # REFER has a handful of empty sentences; nothing to ask
            rows.append(
                QueryRow(
                    dataset=source.dataset,
                    task="referring",
                    split=str(ref["split"]),
                    image_id=str(source.image_id),
                    image_path=source.image_path,
                    text=text,
                    is_sentence=False,
                    height=source.height,
                    width=source.width,
                    mask_rle=rle_cache[ann["id"]],
                    ignore_rle=None,
                    source_id=f"ref:{ref['ref_id']}/sent:{sent.get('sent_id', k)}",
                )
            )
    return rows
