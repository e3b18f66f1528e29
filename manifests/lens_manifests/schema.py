"""The manifest: one Parquet table of queries that every later stage reads.

Each dataset adapter (ReasonSeg, REFER, semantic sets, synthetic) turns its
on-disk source into rows of exactly this schema, so the cache builder, the
trainer and the evaluator never look at a dataset's own format again.

Rows are grouped by image (all queries of one image are contiguous) and
``query_id`` equals the row index, so a cached row is always keyed by it.
"""

from __future__ import annotations

import pyarrow as pa

MANIFEST_FORMAT_VERSION = 1

#: task names used by the training mix (semantic : referring : reasoning)
TASKS = ("semantic", "referring", "reasoning")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),  # "reasonseg", "refcoco", "ade20k", "synthetic_refer", ...
        pa.field("task", pa.string(), nullable=False),  # one of TASKS
        pa.field("split", pa.string(), nullable=False),  # "train", "val", "testA", ...
        pa.field("image_id", pa.string(), nullable=False),  # unique within (dataset, split)
        pa.field("image_path", pa.string(), nullable=False),  # absolute path (or fsspec URL) of the image file
        pa.field("query_id", pa.int64(), nullable=False),  # == row index
        pa.field("text", pa.string(), nullable=False),  # raw phrase (is_sentence False) or sentence (True)
        pa.field("is_sentence", pa.bool_(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),  # original image height
        pa.field("width", pa.int32(), nullable=False),  # original image width
        pa.field("mask_rle", pa.string(), nullable=False),  # COCO compressed RLE ``counts`` of the target (value 1)
        pa.field("ignore_rle", pa.string(), nullable=True),  # COCO compressed RLE of the ignore (255) region, or null
        pa.field("source_id", pa.string(), nullable=True),  # dataset-specific id (ref_id/ann_id, class name, file stem)
    ]
)

MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
