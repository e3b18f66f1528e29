"""One entry point for every dataset: ``build_manifest("refcoco:val", data_root)``.

A spec is ``name`` or ``name:split`` (no split = ``train``):

=====================  =============================================  ==========================
name                   splits                                         reads (under data_root)
=====================  =============================================  ==========================
reasonseg              train, val, test                               reason_seg/ReasonSeg/
refcoco, refcoco+      train, val, testA, testB                       refer_seg/
refcocog               train, val, test                               refer_seg/ (umd split)
refclef                train, val, testA, testB, testC                refer_seg/
ade20k                 train, val                                     ade20k/
cocostuff              train, val                                     cocostuff/ + coco/
mapillary              train, val                                     mapillary/
paco_lvis              train, val, test                               vlpart/paco/ + coco/
pascal_part            train, val                                     vlpart/pascal_part/
synthetic              train, val, test (all three synthetic sets)    a synthetic folder
synthetic-reason       train, val, test                               ... its reason_seg/
synthetic-refer        train, val, testA, testB, test                 ... its refer_seg/synthref
synthetic-sem          train, val, test                               ... its ade20k/
=====================  =============================================  ==========================

Synthetic specs need no data: with ``data_root=None`` the set is generated
(once, default size, see :func:`write_synthetic`) under
``$LENS_DATA_DIR/synthetic/seed-<seed>`` (``LENS_DATA_DIR`` defaults to
``./data``); a set already there for that seed is used whatever its size. With
a ``data_root`` it must hold a set made by ``write_synthetic``, or be empty or
absent (then the default-size set is generated there). ``synthetic:test`` takes REFER's
testA and testB. The ``seed`` also drives the per-image class sampling of the
semantic sets. The returned table records ``spec`` and ``seed`` in its schema
metadata, plus the list of skipped images (``lens_skipped``, see :mod:`.common`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from .common import DATA_ROOT_HINT, ManifestError, concat_manifests
from .reasonseg import load_reasonseg
from .refer import REFER_DATASETS, load_refer
from .semantic import load_ade20k, load_cocostuff, load_mapillary, load_paco_lvis, load_pascal_part
from .manifest_file import SPEC_KEY
from .synthetic import GENERATOR_VERSION, MARKER, REFER_NAME, read_marker, write_synthetic

SEED_KEY = b"seed"

DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "reasonseg": ("train", "val", "test"),
    **{name: src.splits for name, src in REFER_DATASETS.items()},
    "ade20k": ("train", "val"),
    "cocostuff": ("train", "val"),
    "mapillary": ("train", "val"),
    "paco_lvis": ("train", "val", "test"),
    "pascal_part": ("train", "val"),
    "synthetic": ("train", "val", "test"),
    "synthetic-reason": ("train", "val", "test"),
    "synthetic-refer": ("train", "val", "testA", "testB", "test"),
    "synthetic-sem": ("train", "val", "test"),
}

_Builder = Callable[[Path, str, int], pa.Table]

_REAL_BUILDERS: dict[str, _Builder] = {
    "reasonseg": lambda root, split, seed: load_reasonseg(root, split),
    **{name: (lambda n: lambda root, split, seed: load_refer(root, n, split))(name) for name in REFER_DATASETS},
    "ade20k": lambda root, split, seed: load_ade20k(root, split, seed=seed),
    "cocostuff": lambda root, split, seed: load_cocostuff(root, split, seed=seed),
    "mapillary": lambda root, split, seed: load_mapillary(root, split, seed=seed),
    "paco_lvis": lambda root, split, seed: load_paco_lvis(root, split, seed=seed),
    "pascal_part": lambda root, split, seed: load_pascal_part(root, split, seed=seed),
}


def parse_spec(spec: str) -> tuple[str, str]:
    """``"name[:split]"`` -> ``(name, split)``, checked against :data:`DATASET_SPLITS`."""
    name, _, split = spec.strip().partition(":")
    name, split = name.strip().lower(), split.strip() or "train"
    if name not in DATASET_SPLITS:
        raise ManifestError(f"unknown dataset {name!r} in spec {spec!r}; known: {', '.join(DATASET_SPLITS)}")
    if split not in DATASET_SPLITS[name]:
        raise ManifestError(f"unknown split {split!r} for {name}; expected one of {', '.join(DATASET_SPLITS[name])}")
    return name, split


def default_data_dir() -> Path:
    """``$LENS_DATA_DIR`` or ``./data``: where generated data goes when no data root is given."""
    return Path(os.environ.get("LENS_DATA_DIR", "data"))


def default_synthetic_dir(seed: int = 0) -> Path:
    """Folder of the generated synthetic set for ``seed`` when no data root is given."""
    return default_data_dir() / "synthetic" / f"seed-{seed}"


def _synthetic_root(data_root: str | Path | None, seed: int) -> Path:
    if data_root is None:
        root = default_synthetic_dir(seed)
        params = (read_marker(root) or {}).get("params", {})
        # Any finished set of this seed and generator version will do (it may have been
        # made larger on purpose); otherwise make the default-size one.
        if params.get("seed") != seed or params.get("generator_version") != GENERATOR_VERSION:
            write_synthetic(root, seed=seed)
        return root
    root = Path(data_root)
    if read_marker(root) is not None:
        return root
    if not root.exists() or not any(root.iterdir()):
        write_synthetic(root, seed=seed)
        return root
    raise ManifestError(
        f"{root} holds no synthetic data (no {MARKER}); leave --data-root unset to generate it, "
        "or point it at a folder made by write_synthetic"
    )


def _synthetic_table(name: str, split: str, root: Path, seed: int) -> pa.Table:
    if name == "synthetic-reason":
        return load_reasonseg(root, split, dataset="synthetic_reason")
    if name == "synthetic-refer":
        image_dir = root / "refer_seg" / "images" / REFER_NAME
        return load_refer(root, REFER_NAME, split, split_by="unc", image_dir=image_dir, dataset="synthetic_refer")
    if name == "synthetic-sem":
        classes_file = root / "ade20k" / "synthetic_classes.json"
        if not classes_file.is_file():
            raise ManifestError(f"synthetic-sem: {classes_file} not found; regenerate the synthetic set")
        classes = json.loads(classes_file.read_text())
        return load_ade20k(root, split, seed=seed, class_names=classes, dataset="synthetic_sem")
    # the union, in the order of the training mix's tasks (semantic, referring, reasoning)
    parts = [_synthetic_table(f"synthetic-{part}", split, root, seed) for part in ("sem", "refer", "reason")]
    return concat_manifests(parts)


def build_manifest(spec: str, data_root: str | Path | None, *, seed: int = 0) -> pa.Table:
    """Build the manifest table (``MANIFEST_SCHEMA``) for ``spec`` from the data under ``data_root``.

    Raises :class:`ManifestError` (one line) for an unknown dataset or split,
    a missing data root, or a missing expected file/folder.
    """
    name, split = parse_spec(spec)
    if name.startswith("synthetic"):
        table = _synthetic_table(name, split, _synthetic_root(data_root, seed), seed)
    else:
        if data_root is None:
            raise ManifestError(f"{name} needs its data: {DATA_ROOT_HINT}")
        root = Path(data_root)
        if not root.is_dir():
            raise ManifestError(f"data root {root} not found; {DATA_ROOT_HINT}")
        table = _REAL_BUILDERS[name](root, split, seed)
    meta = dict(table.schema.metadata or {})
    meta[SPEC_KEY] = f"{name}:{split}".encode()
    meta[SEED_KEY] = str(seed).encode()
    return table.replace_schema_metadata(meta)
