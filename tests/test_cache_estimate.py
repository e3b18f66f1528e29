"""``lens-cache estimate``: its bytes against a store built for real, its JSON, the published path, its errors.

What "the store's bytes" are here: the sizes of every file under the store's folder (the feature and
bookkeeping chunks, every ``zarr.json``, ``manifest.parquet`` and the warm-start file), as a user's
``du --apparent-size`` counts them. The feature arrays are ~98% of it at the tiny scale; the rest is what a
store keeps once, which the estimate includes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lens_cache.cli import app
from typer.testing import CliRunner

runner = CliRunner()

#: LLaVA-1.5-7B's image-level arrays per image at layer 14: 576 x 4096 float16 states + SAM's 256 x 64 x 64.
LLAVA_IMAGE_FEATURES = 576 * 4096 * 2 + 256 * 64 * 64 * 2
JSON_KEYS = {"images", "queries", "store_bytes", "bytes_per_image", "bytes_per_query", "free_disk_bytes",
             "build_gpu_hours", "build_gpu_hours_at_peak", "train_hours", "train_samples", "train_samples_per_s",
             "counts_from", "splits", "mllm", "compression", "bytes_are", "notes"}


def files_bytes(folder: Path) -> int:
    """The sizes of every file under ``folder``."""
    return sum(os.path.getsize(Path(root) / name) for root, _, names in os.walk(folder) for name in names)


def build_tiny_store(root: Path, out: Path, compression: str) -> None:
    result = runner.invoke(app, ["build", "--split", "synthetic:val", "--data-root", str(root), "--out", str(out),
                                 "--mllm", "tiny", "--sam", "tiny", "--device", "cpu", "--threads", "1", "--quiet",
                                 "--compression", compression])
    assert result.exit_code == 0, result.output


def estimate_json(*args: str) -> dict:
    result = runner.invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    from lens_train.testing import small_synthetic

    return small_synthetic(tmp_path_factory.mktemp("estimate") / "data", images=3)


def test_the_estimate_matches_a_built_store(synthetic_root, tmp_path):
    """Uncompressed, the bytes follow from the format: the estimate is within 5% of the built store (it is
    within 0.1% today); the per-image figure is the arrays' exact one."""
    store = tmp_path / "store"
    build_tiny_store(synthetic_root, store, "none")
    estimate = estimate_json("--split", "synthetic:val", "--data-root", str(synthetic_root), "--mllm", "tiny",
                             "--device", "cpu", "--compression", "none")
    real = files_bytes(store)
    assert estimate["counts_from"] == "manifest" and (estimate["images"], estimate["queries"]) == (9, 34)
    assert abs(estimate["store_bytes"] - real) <= 0.05 * real, (estimate["store_bytes"], real)
    # tiny: d=64, 576 image tokens at layer 14, the tiny SAM's 256 x 64 x 64; 33 bytes of bookkeeping per image
    assert estimate["bytes_per_image"] == 576 * 64 * 2 + 256 * 64 * 64 * 2 + 33
    assert estimate["free_disk_bytes"] >= real


def test_lossless_bytes_are_an_upper_bound(tmp_path):
    """With zstd the estimate says it is an upper bound (ratio 1), and the built store stays under it."""
    from lens_train.testing import small_synthetic

    root = small_synthetic(tmp_path / "data", images=1)
    store = tmp_path / "store"
    build_tiny_store(root, store, "lossless")
    estimate = estimate_json("--split", "synthetic:val", "--data-root", str(root), "--mllm", "tiny", "--device", "cpu")
    real = files_bytes(store)
    assert estimate["bytes_are"] == "upper bound"
    assert real <= estimate["store_bytes"] <= 1.35 * real, (estimate["store_bytes"], real)


def test_json_keys_and_the_published_path():
    """Without --data-root the published figures are used and said so; LLaVA-1.5-7B's real sizes per image."""
    estimate = estimate_json("--split", "refcoco:train", "--mllm", "llava-hf/llava-1.5-7b-hf")
    assert JSON_KEYS <= set(estimate)
    assert estimate["counts_from"] == "published" and estimate["splits"][0]["counts_from"] == "published"
    assert (estimate["images"], estimate["queries"]) == (16_994, 120_624)
    assert estimate["mllm"]["hidden_size"] == 4096 and estimate["layers"] == [14]
    assert LLAVA_IMAGE_FEATURES <= estimate["bytes_per_image"] <= LLAVA_IMAGE_FEATURES + 100
    assert estimate["bytes_per_query"] > 0 and estimate["store_bytes"] > estimate["images"] * LLAVA_IMAGE_FEATURES
    # the FLOP model: 9.86 TFLOP per image at layer 14 (BENCHMARKS.md), computed at MFU 1 and 0.4
    assert estimate["splits"][0]["flops_per_image"] == pytest.approx(9.86e12, rel=0.01)
    assert estimate["build_gpu_hours"] == pytest.approx(estimate["build_gpu_hours_at_peak"] / 0.4)
    assert estimate["preset"] == "official" and estimate["train_samples"] == 5000 * 8 * 4
    assert "projected" in estimate["train_rate_from"] and estimate["train_hours"] > 0


def test_the_table_and_several_splits():
    result = runner.invoke(app, ["estimate", "--split", "refcoco:val,reasonseg:val", "--mllm", "tiny"])
    assert result.exit_code == 0, result.output
    assert "refcoco:val" in result.stdout and "reasonseg:val" in result.stdout
    assert "1,700 images, 11,034 queries (published)" in result.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--split", "refcocoX:train"], "unknown dataset 'refcocox'"),
    (["--split", "refcoco:train", "--mllm", "no-such-mllm"], "unknown MLLM 'no-such-mllm'"),
    (["--split", "refcoco:val", "--mllm", "tiny", "--layers", "99"], "--layers 99 out of range for tiny"),
    (["--split", "refcoco:val", "--data-root", "/no/such/folder"], "data root /no/such/folder not found"),
    (["--split", "paco_lvis:train"], "give --data-root with its data"),
    (["--split", "refcoco:val", "--gpu", "tpu"], "unknown --gpu 'tpu'"),
])
def test_bad_input_is_one_line(args, expected):
    result = runner.invoke(app, ["estimate", *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0]
