"""Pieces every dataset adapter shares: the error type, path checks, row assembly.

Adapters collect :class:`QueryRow` objects in their final order (grouped by
image, deterministic) and hand them to :func:`rows_to_table`, which numbers
them (``query_id`` = row index) and returns a table of ``MANIFEST_SCHEMA``.
Images an adapter had to leave out are reported, not hidden: they are logged
and listed, as JSON, under the table's schema metadata key ``lens_skipped``.

Two guards every adapter applies to what a dataset file says:

* **Sizes.** A height/width declared by a dataset file (REFER's or a COCO
  ``instances.json``) is checked against the image's own header where the image is
  there (PIL reads the header only), and no side may exceed :func:`max_image_side`:
  16384 by default, set by the environment variable ``LENS_MAX_IMAGE_SIDE``. A row
  that fails is skipped with the reason (:func:`declared_size_problem`), so a few
  bytes of JSON can never make the builder allocate gigabytes.
* **Paths.** A file name read from a dataset file must name a file inside the
  folder it is joined to: the project's one rule, :func:`lens_core.paths.path_inside`
  (re-exported here). An absolute name, one whose ``..`` climbs out, or one that
  leads outside the folder through a symlink is skipped and listed, never opened.
  The folder is resolved first, so a data root (or image folder) that is itself a
  link works, and so do links between files inside it. The manifest records the
  path as joined, not resolved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from PIL import Image

# the adapters' path check, the project's one rule (see the module docstring)
from lens_core.paths import UnsafePathError, path_inside  # noqa: F401  (re-exported)

from .schema import MANIFEST_SCHEMA, TASKS

log = logging.getLogger("lens_manifests")

#: schema metadata key holding the JSON list of skipped images ``[{"path", "reason"}]``
SKIPPED_KEY = b"lens_skipped"

DATA_ROOT_HINT = "point --data-root at LISA's dataset folder"

#: environment variable setting the largest image side (height or width) a manifest accepts
MAX_IMAGE_SIDE_ENV = "LENS_MAX_IMAGE_SIDE"
DEFAULT_MAX_IMAGE_SIDE = 16384

#: EXIF orientations that swap width and height (transpose / rotate 90 / transverse / rotate 270)
_EXIF_SWAPS_AXES = {5, 6, 7, 8}
#: the EXIF tag of the orientation
_EXIF_ORIENTATION = 0x0112


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """``(h, w)`` of an opened image as displayed: with its EXIF orientation applied (header only).

    An orientation that cannot be read (a file cut short before it) counts as none: the pixels
    of such a file do not decode either, which its reader reports.
    """
    stored = (int(image.height), int(image.width))
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # PIL raises struct.error, OSError, SyntaxError, ... for a broken header
        orientation = 1
    return stored[::-1] if orientation in _EXIF_SWAPS_AXES else stored


class ManifestError(ValueError):
    """A manifest cannot be built or read; the message says what and where, in one line."""


@dataclass(frozen=True, slots=True)
class QueryRow:
    """One query of a manifest, before numbering (see ``MANIFEST_SCHEMA`` for the fields)."""

    dataset: str
    task: str
    split: str
    image_id: str
    image_path: str
    text: str
    is_sentence: bool
    height: int
    width: int
    mask_rle: str
    ignore_rle: str | None
    source_id: str | None


def utf8_name(path: Path) -> bool:
    """Whether ``path`` (as the file system gave it: undecodable bytes become surrogates) is valid UTF-8."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(path: Path) -> str:
    """``path`` printable and storable whatever its bytes (invalid UTF-8 shown as ``\\xff`` escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Skipped:
    """An image an adapter left out, and why."""

    path: str
    reason: str


def require_path(path: Path, what: str, *, is_dir: bool) -> Path:
    """Return ``path`` if it exists as a folder/file, else raise a one-line :class:`ManifestError`."""
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        raise ManifestError(f"{what}: expected {kind} {path} not found; {DATA_ROOT_HINT}")
    return path


def max_image_side() -> int:
    """The largest height or width a row may have: ``$LENS_MAX_IMAGE_SIDE``, default 16384.

    Raises:
        ManifestError: the variable is set but is not a positive integer.
    """
    raw = os.environ.get(MAX_IMAGE_SIDE_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_SIDE
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ManifestError(f"{MAX_IMAGE_SIDE_ENV} must be a positive integer (pixels), got {raw!r}")
    return value


def _integral(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def size_problem(height: object, width: object) -> str | None:
    """Why ``height`` x ``width`` cannot be an image's size (not positive integers, a side above
    :func:`max_image_side`), or None when it can."""
    if not all(_integral(v) for v in (height, width)):
        return f"size {height!r}x{width!r} is not two integers"
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        return f"size {height}x{width} is empty"
    limit = max_image_side()
    if max(height, width) > limit:
        return f"size {height}x{width} exceeds the limit of {limit} px per side (set {MAX_IMAGE_SIDE_ENV} to change it)"
    return None


def image_header(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((h, w) as stored, (h, w) as displayed)`` of an image, from its header only.

    PIL's ``open`` is lazy (no pixel decoding). "Displayed" applies the EXIF
    orientation tag, as every reader of the project does (:mod:`lens_cache.images`), as
    LISA's ``cv2.imread`` does and as LabelMe did when ReasonSeg's polygons were drawn;
    the two differ for a rotated photo.
    """
    with Image.open(path) as im:
        return (int(im.height), int(im.width)), displayed_size(im)


def declared_size_problem(path: Path, height: object, width: object) -> str | None:
    """Why the size a dataset file declares for the image at ``path`` cannot be used, or None.

    The size must pass :func:`size_problem`, and where the image's header can be read it
    must agree with it (as stored or as displayed). A missing or unreadable image keeps
    its declared size: the cache builder lists it as missing/unreadable itself.
    """
    problem = size_problem(height, width)
    if problem is not None:
        return f"declared {problem}"
    try:
        header = image_header(path)
    except Exception:  # noqa: BLE001 - missing or unreadable: judged by the builder, which opens it
        return None
    if (int(height), int(width)) not in header:
        real = header[0]
        return f"declared size {height}x{width} differs from the image's own {real[0]}x{real[1]}"
    return None


def absolute(path: Path) -> str:
    """Absolute path string without resolving symlinks (the manifest names a file as the data root does,
    even where the root or a folder in it is a link)."""
    return os.path.abspath(path)


def stable_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys``.

    Seeding per item (e.g. per image) keeps every item's draw independent of
    which other items exist or in which order they are processed.
    """
    digest = hashlib.sha256("\x1f".join(keys).encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def rows_to_table(rows: list[QueryRow], *, skipped: list[Skipped] | None = None) -> pa.Table:
    """Number ``rows`` in order and build a ``MANIFEST_SCHEMA`` table."""
    for r in rows:
        if r.task not in TASKS:
            raise ValueError(f"task {r.task!r} is not one of {TASKS}")
    columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for i, r in enumerate(rows):
        columns["query_id"].append(i)
        for name in MANIFEST_SCHEMA.names:
            if name != "query_id":
                columns[name].append(getattr(r, name))
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    return with_skipped(table, skipped or [])


def get_skipped(table: pa.Table) -> list[dict[str, str]]:
    """The images an adapter skipped, as recorded in the table's metadata."""
    raw = (table.schema.metadata or {}).get(SKIPPED_KEY)
    return json.loads(raw) if raw else []


def with_skipped(table: pa.Table, skipped: list[Skipped] | list[dict[str, str]]) -> pa.Table:
    """Return ``table`` with ``skipped`` recorded in its schema metadata (and logged)."""
    items = [s if isinstance(s, dict) else {"path": s.path, "reason": s.reason} for s in skipped]
    if items:
        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in items[:3])
        more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
        log.warning("skipped %d image(s): %s%s", len(items), shown, more)
    meta = dict(table.schema.metadata or {})
    meta[SKIPPED_KEY] = json.dumps(items).encode("utf-8")
    return table.replace_schema_metadata(meta)


def concat_manifests(tables: list[pa.Table]) -> pa.Table:
    """Concatenate manifests and renumber ``query_id``; skipped lists are merged."""
    skipped: list[dict[str, str]] = []
    plain = []
    for t in tables:
        skipped.extend(get_skipped(t))
        plain.append(t.replace_schema_metadata(None))
    if not plain:
        return rows_to_table([], skipped=None)
    table = pa.concat_tables(plain).combine_chunks()
    ids = pa.array(np.arange(table.num_rows, dtype=np.int64), type=pa.int64())
    table = table.set_column(table.schema.get_field_index("query_id"), MANIFEST_SCHEMA.field("query_id"), ids)
    meta = {SKIPPED_KEY: json.dumps(skipped).encode("utf-8")}
    return table.replace_schema_metadata(meta)
