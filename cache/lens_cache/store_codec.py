"""The ``int8`` compression: float16 rows stored as int8 with one float16 absmax scale per row (a Zarr v3 codec).

``lens-cache build --compression int8`` stores every feature array (``store_format.CODEC_FEATURES``) through
:class:`Int8RowScaleCodec`, then zstd: about half the bytes of float16 (at LLaVA-1.5-7B + SAM ViT-H size,
3.41 MB per image before zstd instead of 6.82, 3.04 after on ``benchmarks/bench_codec.py``'s synthetic
features). Where it sits: :func:`lens_cache.store_create.feature_codecs` puts it in a
new store's array metadata, the block writer (:mod:`lens_cache.block_writer`) takes each sample's checksum of
:func:`roundtrip` (the values a reader gets back), and every reader decodes it through zarr. It is registered
with zarr (``zarr.registry.register_codec``) when this module is imported, which every store module does
through :mod:`lens_cache.store_location`; a process that opens such a store without lens_cache gets zarr's
own error for an unknown codec.

The rule, per row (the last ``row_axes`` axes of a chunk, contiguous in C order)::

    scale = max |x| over the row                      (float16: one of the row's own values, so exact)
    q     = rint(x * (127 / scale))  in [-127, 127]   (int8; float32 arithmetic; a zero row: scale 0, q 0)
    x'    = float16(q * (scale / 127))                (what a reader gets)

so ``|x - x'| <= scale / 254`` before the float16 rounding of ``x'``, which adds at most half a float16 ulp of
``x'`` (``tests/test_cache_codec.py`` checks both against a float64 computation). A row's own absmax is its
scale: a massive activation (a channel ~100x the rest) coarsens only its own token's row, not the others.

Rows: one token's d-vector for the MLLM states (``row_axes`` 1), one channel's 64 x 64 map for SAM's
(C, 64, 64) embedding (``row_axes`` 2). SAM's embedding leaves its neck through a LayerNorm2d whose
per-channel weight and bias give each channel its own range; a channel's map is contiguous in the
(1, C, 64, 64) chunk, and 256 scales per image cost 512 bytes, against 8 KiB for one scale per spatial
position (``benchmarks/bench_codec.py`` measures both rows on synthetic data with such channels).

Values that are not finite (inf, NaN) are refused (ValueError on write): the builder refuses them before
(``store_format.to_float16``), and an int8 code has no inf or NaN to keep them.

Encoded chunk: the row scales (float16, little-endian, one per row in C order), then the int8 values (C order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

#: The codec's name in a store's array metadata (``zarr.json``: ``codecs[0].name``).
CODEC_NAME = "lens.int8_rowscale"
#: The largest int8 code: x = +-scale maps to +-127 (symmetric; -128 is never written).
LEVELS = 127
#: The dtype a row's values and its scale are stored from and read back as.
VALUE_DTYPE = np.dtype("float16")
SCALE_DTYPE = np.dtype("<f2")
#: :func:`dequantize`: rows this long or longer decode through a table of their 256 values (shorter: the table
#: would cost more than it saves), gathered :data:`TABLE_BLOCK` values at a time.
TABLE_MIN_ROW, TABLE_BLOCK = 1024, 1 << 16
#: The int8 code of each byte value 0..255 (two's complement), as float32.
_CODE_VALUES = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)


def _rows(values: np.ndarray, row_axes: int) -> np.ndarray:
    """``values`` as (rows, row size): its last ``row_axes`` axes make one row."""
    if not 1 <= row_axes <= values.ndim:
        raise ValueError(f"row_axes {row_axes} does not fit an array of {values.ndim} axes")
    return np.ascontiguousarray(values).reshape(-1, math.prod(values.shape[values.ndim - row_axes :]))


def quantize(values: np.ndarray, row_axes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """float16 ``values`` -> (int8 codes of the same shape, the float16 absmax scale of each row: shape
    ``values.shape[:-row_axes]``).

    Raises:
        ValueError: ``values`` are not float16, or hold inf or NaN.
    """
    values = np.asarray(values)
    if values.dtype != VALUE_DTYPE:
        raise ValueError(f"the int8 codec stores float16 values, not {values.dtype}")
    rows = _rows(values, row_axes)
    # |x| of a float16 orders as its bits without the sign (inf 0x7C00, NaN above it): an exact absmax, ~20x
    # faster than numpy's float16 abs and max
    magnitude = (rows.view(np.uint16) & 0x7FFF).max(axis=1) if rows.shape[1] else np.zeros(len(rows), np.uint16)
    if (magnitude >= 0x7C00).any():
        raise ValueError("the int8 codec refuses values that are not finite (inf or NaN)")
    scale = magnitude.view(VALUE_DTYPE)
    ratio = np.float32(LEVELS) / np.where(magnitude > 0, scale, 1).astype(np.float32)
    codes = rows.astype(np.float32)
    codes *= ratio[:, None]
    np.rint(codes, out=codes)
    np.clip(codes, -LEVELS, LEVELS, out=codes)
    return codes.astype(np.int8).reshape(values.shape), scale.reshape(values.shape[: values.ndim - row_axes])


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 ``codes`` and their rows' float16 ``scale`` -> float16 values (what a reader gets).

    ``float16(code * float32(scale / 127))`` for every value. numpy's float32 -> float16 cast is the slow step
    (~300 MB/s), so rows of :data:`TABLE_MIN_ROW` values or more take theirs from a table of the row's 256
    possible values instead (~2-3x faster; the same products, so the same bits: a test compares both ways).
    """
    if codes.size == 0:
        return codes.astype(VALUE_DTYPE)
    rows = codes.reshape(scale.size, -1)
    step = scale.reshape(-1).astype(np.float32) / np.float32(LEVELS)
    with np.errstate(over="ignore"):  # only code -128 (never written) times a scale near 65504 overflows: inf
        if rows.shape[1] < TABLE_MIN_ROW:
            return (rows.astype(np.float32) * step[:, None]).astype(VALUE_DTYPE).reshape(codes.shape)
        table = (step[:, None] * _CODE_VALUES).astype(VALUE_DTYPE).view(np.uint16).reshape(-1)  # row r: r*256 + byte
    by_byte, out = rows.view(np.uint8), np.empty(rows.shape, np.uint16)
    per = max(1, TABLE_BLOCK // rows.shape[1])  # rows per gather: its index array stays in cache
    for start in range(0, len(rows), per):
        index = by_byte[start : start + per].astype(np.intp)
        index += (np.arange(start, start + len(index), dtype=np.intp) << 8)[:, None]
        np.take(table, index, out=out[start : start + per])
    return out.view(VALUE_DTYPE).reshape(codes.shape)


def roundtrip(values: np.ndarray, row_axes: int = 1) -> np.ndarray:
    """``values`` as a store of this codec reads them back (what the block writer takes checksums of)."""
    return dequantize(*quantize(values, row_axes))


def encode_chunk(values: np.ndarray, row_axes: int) -> np.ndarray:
    """A chunk's bytes (uint8): its row scales (float16 LE), then its int8 codes."""
    codes, scale = quantize(values, row_axes)
    return np.concatenate([scale.astype(SCALE_DTYPE).reshape(-1).view(np.uint8), codes.reshape(-1).view(np.uint8)])


def encoded_size(shape: tuple[int, ...], row_axes: int) -> int:
    """Bytes of an encoded chunk of ``shape``: one byte per value, two per row."""
    return math.prod(shape) + SCALE_DTYPE.itemsize * math.prod(shape[: len(shape) - row_axes])


def decode_chunk(data: np.ndarray, shape: tuple[int, ...], row_axes: int) -> np.ndarray:
    """:func:`encode_chunk`'s bytes -> the float16 values of a chunk of ``shape``.

    Raises:
        ValueError: ``data`` is not as long as such a chunk's bytes (a damaged chunk).
    """
    expected = encoded_size(shape, row_axes)
    if data.size != expected:
        raise ValueError(f"an int8 chunk of {data.size} bytes, expected {expected} for shape {shape}")
    split = expected - math.prod(shape)
    scale = data[:split].view(SCALE_DTYPE).reshape(shape[: len(shape) - row_axes])
    return dequantize(data[split:].view(np.int8).reshape(shape), scale)


@dataclass(frozen=True)
class Int8RowScaleCodec(ArrayBytesCodec):
    """Zarr v3 array -> bytes codec of the module's rule (in place of ``bytes``; a compressor such as zstd follows).

    Args:
        row_axes: how many trailing axes of a chunk make one row (1: a token's d-vector; 2: a SAM channel's map).
    """

    is_fixed_size = True

    row_axes: int

    def __init__(self, *, row_axes: int = 1) -> None:
        if not isinstance(row_axes, int) or isinstance(row_axes, bool) or row_axes < 1:
            raise ValueError(f"row_axes must be an int >= 1, got {row_axes!r}")
        object.__setattr__(self, "row_axes", row_axes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Int8RowScaleCodec:
        _, configuration = parse_named_configuration(data, CODEC_NAME, require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"row_axes": self.row_axes}}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        if np.dtype(dtype.to_native_dtype()) != VALUE_DTYPE:
            raise ValueError(f"{CODEC_NAME} stores float16 arrays, not {dtype.to_native_dtype()}")
        if self.row_axes > len(shape):
            raise ValueError(f"{CODEC_NAME}: row_axes {self.row_axes} does not fit an array of {len(shape)} axes")

    def roundtrip(self, values: np.ndarray) -> np.ndarray:
        """``values`` (any leading axes, the rows last) as an array of this codec reads them back."""
        return roundtrip(values, self.row_axes)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = encode_chunk(chunk_array.as_numpy_array(), self.row_axes)
        return chunk_spec.prototype.buffer.from_array_like(data)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        data = np.asarray(chunk_bytes.as_numpy_array()).view(np.uint8).reshape(-1)
        values = decode_chunk(data, tuple(chunk_spec.shape), self.row_axes)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(values)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        return encoded_size(tuple(chunk_spec.shape), self.row_axes)


register_codec(CODEC_NAME, Int8RowScaleCodec)
