"""lens_manifests: every dataset as one Parquet table of queries (see :mod:`.schema`).

Typical use::

    from lens_manifests import build_manifest, write_manifest, read_manifest, decode_target

    table = build_manifest("refcoco:val", "/data/lisa")        # or "synthetic:val", None
    digest = write_manifest(table, "manifests/refcoco_val.parquet")
    table = read_manifest("manifests/refcoco_val.parquet")     # checks version, schema, hash
    target = decode_target(table, 0)                           # uint8 (H, W): 0, 1, 255 = ignore
"""

from .common import ManifestError, get_skipped
from .registry import DATASET_SPLITS, build_manifest, default_synthetic_dir, parse_spec
from .rle import decode_rle, decode_target, encode_mask, polygons_to_mask
from .safe_pickle import BrokenPickleError, UnsafePickleError, safe_load
from .schema import MANIFEST_COLUMNS, MANIFEST_FORMAT_VERSION, MANIFEST_SCHEMA, TASKS
from .manifest_file import manifest_hash, read_manifest, recorded_hash, write_manifest
from .synthetic import write_synthetic

__all__ = [
    "BrokenPickleError",
    "DATASET_SPLITS",
    "MANIFEST_COLUMNS",
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_SCHEMA",
    "TASKS",
    "ManifestError",
    "UnsafePickleError",
    "build_manifest",
    "decode_rle",
    "decode_target",
    "default_synthetic_dir",
    "encode_mask",
    "get_skipped",
    "manifest_hash",
    "parse_spec",
    "polygons_to_mask",
    "read_manifest",
    "recorded_hash",
    "safe_load",
    "write_manifest",
    "write_synthetic",
]
