"""``--compression int8``: the int8 row-scale codec (``lens_cache.store_codec``) and a store built with it.

The codec's bound is checked against an independent float64 computation; a store of it reads back the
extractor's values through the same round trip, is about half the bytes of a lossless one, passes ``verify``,
and its damage is still found.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr
from lens_cache.build import build_cache
from lens_cache.cli import app
from lens_cache.store import DamagedStoreError, FeatureStore, StoreError, verify_store
from lens_cache.store_codec import (
    CODEC_NAME,
    LEVELS,
    TABLE_MIN_ROW,
    Int8RowScaleCodec,
    decode_chunk,
    dequantize,
    encoded_size,
    quantize,
    roundtrip,
)
from lens_cache.testing import DAMAGE_KINDS, damage_chunk, fake_build_extractor, fake_factory, make_test_manifest
from typer.testing import CliRunner

LAYER = 14
FEATURES = ("images/sam", f"images/mllm_l{LAYER}", f"queries/text_l{LAYER}")


def llama_like(rng: np.random.Generator, tokens: int = 64, d: int = 256) -> np.ndarray:
    """float16 states: N(0, 1) rows of varying norm, two channels ~100x the rest on every 8th token, a zero row."""
    x = rng.standard_normal((tokens, d)) * np.exp(rng.normal(0, 0.5, (tokens, 1)))
    x[::8, [3, d // 2 + 1]] = rng.choice([-1, 1], (len(x[::8]), 2)) * rng.uniform(80, 120, (len(x[::8]), 2))
    x[5] = 0
    x[6] *= 1e-4  # tiny values: float16 subnormals in the row
    return x.astype(np.float16)


def reference(x: np.ndarray, row_axes: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 absmax per row and the exact dequantised values, written apart from the codec."""
    rows = x.astype(np.float64).reshape(-1, int(np.prod(x.shape[x.ndim - row_axes :])))
    scale = np.abs(rows).max(axis=1, keepdims=True)
    codes = np.rint(rows / np.where(scale > 0, scale, 1) * LEVELS)
    return scale, codes * scale / LEVELS


@pytest.mark.parametrize("row_axes,shape", [(1, (64, 256)), (2, (1, 16, 8, 8)), (1, (2, 3, 5, 40))])
def test_round_trip_is_within_half_a_step_of_each_row(row_axes, shape):
    rng = np.random.default_rng(row_axes)
    x = llama_like(rng, int(np.prod(shape[:-1])), shape[-1]).reshape(shape)
    codes, scale = quantize(x, row_axes)
    assert codes.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == shape[: len(shape) - row_axes]
    ref_scale, ref_values = reference(x, row_axes)
    np.testing.assert_array_equal(scale.reshape(-1, 1).astype(np.float64), ref_scale)  # absmax: exact in float16
    y = roundtrip(x, row_axes)
    assert y.dtype == np.float16 and y.shape == x.shape
    rows_x, rows_y = x.astype(np.float64).reshape(len(ref_scale), -1), y.astype(np.float64).reshape(len(ref_scale), -1)
    # the rule before the float16 rounding of the result: within scale / 254 of x
    assert np.all(np.abs(ref_values - rows_x) <= ref_scale / (2 * LEVELS) * (1 + 1e-12))
    # the codec's float16 values: the same, plus at most half a float16 ulp of the value read back
    half_ulp = np.spacing(np.abs(rows_y).astype(np.float16)).astype(np.float64) / 2
    assert np.all(np.abs(rows_y - rows_x) <= ref_scale / (2 * LEVELS) * (1 + 1e-6) + half_ulp)
    assert np.all(np.abs(rows_y - ref_values) <= half_ulp + ref_scale * 1e-6)  # float32 arithmetic: ties aside
    # each row's largest value comes back exactly (code +-127)
    peak = np.abs(rows_x).argmax(axis=1)
    np.testing.assert_array_equal(rows_y[np.arange(len(peak)), peak], rows_x[np.arange(len(peak)), peak])


def test_massive_activations_coarsen_only_their_own_rows():
    x = llama_like(np.random.default_rng(0))
    d = x.shape[1]
    rest = [channel for channel in range(d) if channel not in (3, d // 2 + 1)]  # the channels that are not massive
    error = np.abs(roundtrip(x).astype(np.float64) - x).max(axis=1)
    with np.errstate(invalid="ignore"):  # row 5 is zero: 0 / 0, not among the rows compared
        relative = error / np.sqrt((x[:, rest].astype(np.float64) ** 2).mean(axis=1))
    ordinary = [row for row in range(len(x)) if row % 8 and row not in (5, 6)]
    assert relative[ordinary].max() < 0.05  # absmax / 254 of a Gaussian row: ~1.5% of its RMS
    assert relative[::8].min() > 0.1  # a step of ~100 / 127 on the massive rows, against an RMS of ~1


def test_both_ways_of_decoding_give_the_same_bits():
    """Long rows decode through a table of their 256 values, short ones product by product: the same float16 bits,
    for every code (-128 included: a damaged chunk may hold it) and a float16 scale of every binade."""
    scales = np.arange(1, 0x7C00, 3, dtype=np.uint16).view(np.float16)  # every 3rd positive finite float16
    scales = np.concatenate([scales, np.array([65504, 6e-8, 1.0], np.float16)])
    codes = np.resize(np.arange(-128, 128, dtype=np.int8), (len(scales), TABLE_MIN_ROW))
    with np.errstate(over="ignore"):  # -128 x 65504 / 127: inf both ways
        direct = (codes.astype(np.float32) * (scales.astype(np.float32) / np.float32(LEVELS))[:, None]).astype(np.float16)
    np.testing.assert_array_equal(dequantize(codes, scales).view(np.uint16), direct.view(np.uint16))  # the table
    short = codes[:, : TABLE_MIN_ROW // 4].reshape(len(scales), 4, -1)  # 4 rows of 256 per scale: product by product
    np.testing.assert_array_equal(dequantize(short, np.repeat(scales[:, None], 4, axis=1)).view(np.uint16),
                                  direct[:, : TABLE_MIN_ROW // 4].reshape(short.shape).view(np.uint16))


def test_zero_rows_and_empty_values():
    x = np.zeros((3, 4, 16), np.float16)
    x[1, 2] = np.float16(-3.5)
    x[2, 0, 0] = np.float16(-0.0)
    codes, scale = quantize(x, 1)
    assert not codes[0].any() and not scale[0].any() and scale[1, 2] == 3.5
    y = roundtrip(x, 1)
    np.testing.assert_array_equal(y, x)  # zeros stay zero (no 0 / 0), a lone value is its own scale
    assert not np.signbit(y[2, 0, 0])  # -0.0 reads back as +0.0: the checksum is taken of what reads back


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_values_that_are_not_finite_are_refused(bad, tmp_path):
    """inf and NaN are refused, not propagated: an int8 code has neither (the builder refuses them before)."""
    x = np.ones((2, 8), np.float16)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="not finite"):
        quantize(x)
    with pytest.raises(ValueError, match="float16"):
        quantize(x.astype(np.float32))
    array = zarr.create_array(str(tmp_path / "a"), shape=(2, 8), chunks=(1, 8), dtype="float16", fill_value=0,
                              serializer=Int8RowScaleCodec(row_axes=1))
    with pytest.raises(ValueError, match="not finite"):
        array[:] = x
    array[0] = x[0]  # the finite row is written
    np.testing.assert_array_equal(array[0], x[0])


def test_codec_metadata_and_a_damaged_length():
    codec = Int8RowScaleCodec(row_axes=2)
    assert codec.to_dict() == {"name": CODEC_NAME, "configuration": {"row_axes": 2}}
    assert Int8RowScaleCodec.from_dict(codec.to_dict()) == codec
    with pytest.raises(ValueError, match="row_axes"):
        Int8RowScaleCodec(row_axes=0)
    with pytest.raises(ValueError, match="of 35 bytes, expected 36 for shape"):
        decode_chunk(np.zeros(35, np.uint8), (2, 16), 1)  # 2 scales (4 bytes) + 32 codes, one byte short
    with pytest.raises(ValueError, match="stores float16 arrays"):
        zarr.create_array({}, shape=(2, 8), chunks=(1, 8), dtype="float32", serializer=codec)


# ----------------------------------------------------------------------------- a store built with --compression int8


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_test_manifest(tmp_path_factory.mktemp("images"), num_images=5, seed=3)


def build(manifest, out, compression):
    return build_cache(manifest, out, fake_factory(hidden_size=64), spec="testset:val", block_size=2,
                       compression=compression, progress=False)


@pytest.fixture(scope="module")
def stores(manifest, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    return {name: build(manifest, folder / name, name) for name in ("lossless", "int8")}


def test_int8_store_reads_back_the_round_trip_of_the_features(stores):
    exact, lossy = stores["lossless"], stores["int8"]
    assert lossy.attrs["compression"] == "int8" and lossy.compression == "int8"
    for name in FEATURES:
        codec = lossy.array(name).serializer
        assert isinstance(codec, Int8RowScaleCodec) and codec.row_axes == (2 if name == "images/sam" else 1)
        metadata = json.loads(lossy.location.read_bytes(f"{name}/zarr.json"))
        assert [c["name"] for c in metadata["codecs"]] == [CODEC_NAME, "zstd"]
        values = exact.array(name)[:]
        np.testing.assert_array_equal(lossy.array(name)[:], roundtrip(values, codec.row_axes))
    for image in range(exact.num_images):
        want, got = exact.read_image(image, LAYER), lossy.read_image(image, LAYER)  # checked against the crc32s
        for key, row_axes in (("image_states", 1), ("sam_embedding", 2)):
            x, y = want[key].astype(np.float64), got[key].astype(np.float64)
            scale = np.abs(x).reshape(-1, x.shape[-1] if row_axes == 1 else 64 * 64).max(axis=1)
            bound = np.repeat(scale, x.size // scale.size).reshape(x.shape) / (2 * LEVELS)
            assert np.all(np.abs(x - y) <= bound + np.spacing(np.abs(y).astype(np.float16)) / 2)
            assert not np.array_equal(x, y)
    query = int(exact.first_query[1])
    assert lossy.read_query(query, LAYER)["text_states"].shape == exact.read_query(query, LAYER)["text_states"].shape


def test_int8_store_is_about_half_the_bytes_of_a_lossless_one(stores):
    exact, lossy = stores["lossless"], stores["int8"]
    for name, row_axes in (("images/sam", 2), (f"images/mllm_l{LAYER}", 1)):
        array = exact.array(name)
        raw = array.nbytes  # float16, uncompressed: 2 bytes per value
        # before zstd: 1 byte per value + 2 per row, ~0.5 of float16 (SAM 0.5001, these 64-wide states 0.516)
        expected = exact.num_images * encoded_size(array.chunks[1:], row_axes) / raw
        assert 0.5 < expected < 0.52
        assert lossy.location.bytes_under(name) <= expected * raw * 1.01  # zstd adds no more than its frame
        ratio = lossy.location.bytes_under(name) / exact.location.bytes_under(name)
        assert ratio < 0.6, (name, ratio)  # the fake features: lossless (zstd) keeps ~0.92 of float16, int8 ~0.49


def test_int8_store_passes_verify_and_resumes_only_as_int8(manifest, stores, tmp_path):
    assert verify_store(stores["int8"].url).ok
    out = tmp_path / "store"
    shutil.copytree(stores["int8"].location.local_path, out)
    again = build_cache(manifest, out, fake_factory(hidden_size=64), spec="testset:val", progress=False)
    assert again.compression == "int8" and again.complete  # no --compression: the store's own
    with pytest.raises(StoreError, match="was built with compression 'int8' but this build asks for 'lossless'"):
        build(manifest, out, "lossless")


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damage_to_an_int8_chunk_is_found(stores, tmp_path, kind):
    copy = tmp_path / "store"
    shutil.copytree(stores["int8"].location.local_path, copy)
    damage_chunk(copy / "images" / "sam" / "c" / "0" / "0" / "0" / "0", kind)  # image 0 (block 0)
    report = verify_store(copy)
    assert not report.ok and report.damaged_blocks == [0]
    assert report.problems[0].startswith("block 0: image 0: images/sam: ")
    with pytest.raises(DamagedStoreError, match=r"image 0 is damaged \(images/sam: "):
        FeatureStore.open(copy).read_image(0, LAYER)


def test_other_values_in_a_valid_int8_chunk_fail_the_checksum(stores, tmp_path):
    """Damage that still decodes (a chunk rewritten with other values) is caught by the crc32 of what reads back."""
    copy = tmp_path / "store"
    shutil.copytree(stores["int8"].location.local_path, copy)
    array = zarr.open_array(str(copy / "images" / f"mllm_l{LAYER}"), mode="r+")
    values = array[3]
    values[0, 0] += np.float16(1)
    array[3] = values
    report = verify_store(copy)
    assert report.damaged_blocks == [1]
    assert f"block 1: image 3: images/mllm_l{LAYER}: checksum mismatch, its bytes changed" in report.problems[0]


def test_a_reader_without_lens_cache_gets_zarrs_own_error(stores):
    script = "import sys, zarr; zarr.open_array(sys.argv[1], mode='r')[0]"
    result = subprocess.run([sys.executable, "-c", script, f"{stores['int8'].url}/images/sam"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and CODEC_NAME in result.stderr


def test_cli_build_with_compression_int8(monkeypatch, manifest, tmp_path):
    import lens_cache.backbones
    from lens_manifests import write_manifest

    monkeypatch.setattr(lens_cache.backbones, "build_extractor", fake_build_extractor, raising=False)
    path = tmp_path / "manifest.parquet"
    write_manifest(manifest, path, spec="testset:val")
    out = tmp_path / "store"
    runner = CliRunner()
    result = runner.invoke(app, ["build", "--manifest", str(path), "--out", str(out), "--compression", "int8", "--quiet"])
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(out).compression == "int8"
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0 and "compression int8" in result.stdout
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0 and result.stdout.strip().endswith("OK")
    assert "int8" in runner.invoke(app, ["build", "--help"]).stdout


def test_the_estimate_uses_the_codecs_bytes_before_zstd():
    from lens_cache.estimate import COMPRESSION_RATIOS

    ratio, kind = COMPRESSION_RATIOS["int8"]
    assert kind == "upper bound"
    for shape, row_axes in (((1, 576, 4096), 1), ((1, 256, 64, 64), 2)):  # LLaVA-1.5-7B's states, SAM ViT-H's
        assert ratio == encoded_size(shape, row_axes) / (2 * int(np.prod(shape)))
    result = CliRunner().invoke(app, ["estimate", "--split", "refcoco:train", "--mllm", "llava-hf/llava-1.5-7b-hf",
                                      "--compression", "int8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["compression_ratio"] == ratio and any(note.startswith("compression int8") for note in report["notes"])
