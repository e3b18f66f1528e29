"""The feature store format: pinned self-description, reader API, refusals, URLs, compression."""

from __future__ import annotations

import pickle
import shutil
import textwrap
import warnings
import zlib

import numpy as np
import pytest
import zarr
from lens_cache.block_writer import BlockWriter
from lens_cache.build import build_cache
from lens_cache.store import (
    ATTRS_KEY,
    FORMAT_VERSION,
    INDEX_ARRAYS,
    DamagedStoreError,
    FeatureStore,
    MissingLayerError,
    StoreError,
    check_compatible,
    expected_arrays,
    identity_hash,
    layout_table,
    missing_blocks,
    open_group,
    sample_arrays,
    verify_store,
)
from lens_cache.testing import DAMAGE_KINDS, FakeExtractor, damage_chunk, fake_factory, make_test_manifest
from PIL import Image

LAYER = 14


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_test_manifest(tmp_path_factory.mktemp("images"), num_images=5, seed=3)


@pytest.fixture(scope="module")
def store(manifest, tmp_path_factory) -> FeatureStore:
    out = tmp_path_factory.mktemp("stores") / "store"
    return build_cache(manifest, out, fake_factory(), spec="testset:val", block_size=2, batch_size=2, progress=False)


def test_self_description_is_pinned(store, manifest):
    """The contract with stage 2: change it only with a new format_version (like streaming's test_config)."""
    attrs = store.attrs
    assert set(attrs) == {
        "format_version", "identity", "identity_hash", "manifest_hash", "spec", "layers", "hidden_size",
        "num_image_tokens", "sam_channels", "num_images", "num_queries", "num_blocks", "max_text_len", "storage_dtype",
        "compression", "block_size", "failure_reasons", "checksums", "prefix", "text_variants", "num_failed_images",
        "created_by", "libraries", "build_id", "complete",
    }  # fmt: skip
    assert attrs["format_version"] == 6
    assert attrs["prefix"] is None  # the fake backbone gives no prefix states (tests/test_cache_fidelity_prefix.py)
    # nor a question set: one question per query (tests/test_cache_fidelity_templates.py)
    assert attrs["text_variants"] is None
    assert attrs["complete"] is True
    assert attrs["storage_dtype"] == "float16"
    assert attrs["compression"] == "lossless"
    assert attrs["layers"] == [14] and attrs["hidden_size"] == 16 and attrs["num_image_tokens"] == 576
    assert attrs["sam_channels"] == 256  # SAM's prompt width (the toy SAM's is 64: tests/test_backbones_sam.py)
    assert attrs["num_images"] == 5 and attrs["num_queries"] == manifest.num_rows
    assert attrs["block_size"] == 2 and attrs["num_blocks"] == 3
    assert attrs["failure_reasons"] == {
        "1": "missing", "2": "unreadable", "3": "size_mismatch", "4": "bad_geometry", "5": "bad_text"
    }
    assert attrs["created_by"].startswith("lens-seg ")
    assert len(attrs["identity_hash"]) == 64 and len(attrs["manifest_hash"]) == 64
    # crc32 of what was written; q: the most queries of any block (the width of a block's query checksums)
    starts = [*store.first_query.tolist(), manifest.num_rows]
    q = max(starts[min(b + 2, 5)] - starts[b] for b in (0, 2, 4))
    index = {name: zlib.crc32(store.array(name)[:].data)
             for name in ("images/first_query", "queries/image_index", "queries/text_len")}
    assert attrs["checksums"] == {"algorithm": "crc32", "block_queries": q, "index": index}

    n_img, n_q, t = 5, manifest.num_rows, attrs["max_text_len"]
    layout = {
        name: (tuple(store.array(name).shape), str(store.array(name).dtype), tuple(store.array(name).chunks))
        for name in store.array_names()
    }
    assert layout == {
        "blocks/crc32": ((3,), "uint32", (1,)),
        "blocks/done": ((3,), "uint8", (1,)),
        "images/failed": ((n_img,), "uint8", (2,)),
        "images/first_query": ((n_img,), "int64", (n_img,)),
        "images/input_size": ((n_img, 2), "int32", (2, 2)),
        "images/mllm_l14": ((n_img, 576, 16), "float16", (1, 576, 16)),
        "images/mllm_l14_crc32": ((n_img,), "uint32", (2,)),
        "images/original_size": ((n_img, 2), "int32", (2, 2)),
        "images/sam": ((n_img, 256, 64, 64), "float16", (1, 256, 64, 64)),
        "images/sam_crc32": ((n_img,), "uint32", (2,)),
        "queries/failed": ((n_q,), "uint8", (n_q,)),
        "queries/image_index": ((n_q,), "int64", (n_q,)),
        "queries/text_l14": ((n_q, t, 16), "float16", (1, t, 16)),
        "queries/text_l14_crc32": ((3, q), "uint32", (1, q)),
        "queries/text_len": ((n_q,), "int32", (n_q,)),
    }
    # Zarr v3, unsharded, zstd: what makes concurrent per-sample writes safe.
    features = store.array("images/mllm_l14")
    assert features.metadata.zarr_format == 3
    assert features.shards is None
    assert [type(c).__name__ for c in features.compressors] == ["ZstdCodec"]
    assert store.location.read_bytes("manifest.parquet")[:4] == b"PAR1"


#: The arrays of a format-version-3 store (name -> shape, dtype, chunks, in the order the schema
#: lists them) with layers (3, 7), d = 8 and the toy SAM's C = 64, built over this module's manifest
#: with block_size 2: N_img = 5, N_q = 11, N_blocks = 3, T = max_text_len = 13, Q = block_queries = 5,
#: P = 576 image tokens; index chunks min(N, 65536) = N. Change it only with a new format_version.
#: (A version-4 store without prefix states has the same.)
PINNED_LAYOUT_V3 = [
    ("images/mllm_l3", ((5, 576, 8), "float16", (1, 576, 8))),
    ("queries/text_l3", ((11, 13, 8), "float16", (1, 13, 8))),
    ("images/mllm_l7", ((5, 576, 8), "float16", (1, 576, 8))),
    ("queries/text_l7", ((11, 13, 8), "float16", (1, 13, 8))),
    ("images/sam", ((5, 64, 64, 64), "float16", (1, 64, 64, 64))),
    ("images/original_size", ((5, 2), "int32", (2, 2))),
    ("images/input_size", ((5, 2), "int32", (2, 2))),
    ("images/failed", ((5,), "uint8", (2,))),
    ("images/first_query", ((5,), "int64", (5,))),
    ("queries/text_len", ((11,), "int32", (11,))),
    ("queries/image_index", ((11,), "int64", (11,))),
    ("queries/failed", ((11,), "uint8", (11,))),
    ("blocks/done", ((3,), "uint8", (1,))),
    ("images/sam_crc32", ((5,), "uint32", (2,))),
    ("images/mllm_l3_crc32", ((5,), "uint32", (2,))),
    ("queries/text_l3_crc32", ((3, 5), "uint32", (1, 5))),
    ("images/mllm_l7_crc32", ((5,), "uint32", (2,))),
    ("queries/text_l7_crc32", ((3, 5), "uint32", (1, 5))),
    ("blocks/crc32", ((3,), "uint32", (1,))),
]
#: Version 4 with prefix states: P_pre = 4 prompt tokens before the image, one (P_pre, d) array per layer
#: after SAM's embeddings.
PINNED_LAYOUT_V4 = [
    *PINNED_LAYOUT_V3[:5],
    ("prefix/mllm_l3", ((4, 8), "float16", (4, 8))),
    ("prefix/mllm_l7", ((4, 8), "float16", (4, 8))),
    *PINNED_LAYOUT_V3[5:],
]
#: Version 5 with the text states of a query's other question templates (the ``authors`` set: T = 11, the
#: longest evaluation question; V_t = 4 training questions of a phrase, T_v = 16 the longest of them): after
#: each layer's text states, the variants; their L_t after the index arrays; their checksums after each
#: layer's text checksums.
PINNED_LAYOUT_V5 = [
    PINNED_LAYOUT_V4[0],
    ("queries/text_l3", ((11, 11, 8), "float16", (1, 11, 8))),
    ("queries/variants_l3", ((11, 4, 16, 8), "float16", (1, 4, 16, 8))),
    PINNED_LAYOUT_V4[2],
    ("queries/text_l7", ((11, 11, 8), "float16", (1, 11, 8))),
    ("queries/variants_l7", ((11, 4, 16, 8), "float16", (1, 4, 16, 8))),
    *PINNED_LAYOUT_V4[4:13],
    ("queries/variant_text_len", ((11, 4), "int32", (11, 4))),
    *PINNED_LAYOUT_V4[13:18],
    ("queries/variants_l3_crc32", ((3, 5), "uint32", (1, 5))),
    *PINNED_LAYOUT_V4[18:20],
    ("queries/variants_l7_crc32", ((3, 5), "uint32", (1, 5))),
    PINNED_LAYOUT_V4[20],
]


def test_schema_is_pinned_against_the_format_version(manifest, tmp_path):
    """The one schema (lens_cache.store_format.SCHEMA) against a literal table: what creation writes on
    disk, what verify expects, what the block writer opens and the docstring's table all come from it."""
    import lens_cache.store

    assert FORMAT_VERSION == 6, "a new format version: pin its layout here"  # 6: attrs only (libraries)
    two_layers = build_cache(
        manifest, tmp_path / "store", fake_factory(layers=(3, 7), hidden_size=8, sam_channels=64, prefix_tokens=4),
        spec="testset:val", block_size=2, batch_size=2, progress=False,
    )  # fmt: skip
    attrs = two_layers.attrs
    assert (attrs["num_images"], attrs["num_queries"], attrs["num_blocks"]) == (5, 11, 3)
    assert (attrs["max_text_len"], attrs["checksums"]["block_queries"]) == (13, 5)
    on_disk = {}
    for name in two_layers.array_names():
        array = two_layers.array(name)
        on_disk[name] = (tuple(array.shape), str(array.dtype), tuple(array.chunks))
        assert array.fill_value == 0, name
    assert on_disk == dict(PINNED_LAYOUT_V4)
    assert list(expected_arrays(attrs).items()) == PINNED_LAYOUT_V4  # verify's table, in the schema's order
    assert attrs["prefix"] == {"length": 4, "token_ids": [1, 2, 3, 4]}
    # without prefix states (a version-3 store, or a backbone that gives none): the version-3 layout
    assert list(expected_arrays({**attrs, "prefix": None}).items()) == PINNED_LAYOUT_V3
    assert list(expected_arrays({key: v for key, v in attrs.items() if key != "prefix"}).items()) == PINNED_LAYOUT_V3
    block_written = {name for name, _ in PINNED_LAYOUT_V3 if name not in INDEX_ARRAYS and name != "queries/failed"}
    assert set(BlockWriter(two_layers.url).arrays) == block_written
    assert INDEX_ARRAYS == ("images/first_query", "queries/image_index", "queries/text_len")
    assert sample_arrays(two_layers.layers) == [
        "images/sam", "images/mllm_l3", "queries/text_l3", "images/mllm_l7", "queries/text_l7"
    ]
    # version 5 with text variants (the authors' question set: every template of a query cached)
    variants = build_cache(
        manifest, tmp_path / "variants",
        fake_factory(layers=(3, 7), hidden_size=8, sam_channels=64, prefix_tokens=4, question_set="authors"),
        spec="testset:val", block_size=2, batch_size=2, progress=False,
    )  # fmt: skip
    v5 = variants.attrs
    assert v5["text_variants"]["count"] == 5 and v5["text_variants"]["max_len"] == 16
    assert {name: (tuple(variants.array(name).shape), str(variants.array(name).dtype),
                   tuple(variants.array(name).chunks)) for name in variants.array_names()} == dict(PINNED_LAYOUT_V5)
    assert list(expected_arrays(v5).items()) == PINNED_LAYOUT_V5
    assert list(expected_arrays({**v5, "text_variants": None, "max_text_len": 13}).items()) == PINNED_LAYOUT_V4
    assert variants.sample_array_names == [
        "images/sam", "images/mllm_l3", "queries/text_l3", "queries/variants_l3", "images/mllm_l7", "queries/text_l7",
        "queries/variants_l7",
    ]
    assert set(BlockWriter(variants.url).arrays) == block_written | {
        "queries/variants_l3", "queries/variants_l7", "queries/variants_l3_crc32", "queries/variants_l7_crc32"}
    assert set(v5["checksums"]["index"]) == {*INDEX_ARRAYS, "queries/variant_text_len", "prefix/mllm_l3", "prefix/mllm_l7"}
    # a version-1 store: the same arrays without the checksums, and C = 256 (it did not record sam_channels)
    v1 = {key: value for key, value in attrs.items() if key not in ("sam_channels", "checksums", "prefix")}
    v1_layout = [row for row in PINNED_LAYOUT_V3 if "crc32" not in row[0]]
    v1_layout[4] = ("images/sam", ((5, 256, 64, 64), "float16", (1, 256, 64, 64)))
    assert list(expected_arrays({**v1, "format_version": 1}).items()) == v1_layout
    # the contract (lens_cache.store's docstring) holds the table the schema renders
    assert textwrap.indent(layout_table(), "    ") in lens_cache.store.__doc__


def test_rows_per_image_or_query_follow_the_schema(store):
    """``is_image_array``/``is_query_array`` (used by ``lens-cache info`` for bytes per image and per
    query) agree with each array's actual first dimension; the text checksums have a row per block."""
    from lens_cache.store_format import is_image_array, is_query_array

    counts = {"image": store.num_images, "query": store.num_queries, "block": store.num_blocks}
    assert len(set(counts.values())) == 3  # 5 images, more queries, 3 blocks: the kinds can be told apart
    group = open_group(store.location, mode="r")
    for name in store.array_names():
        kind = "image" if is_image_array(name) else "query" if is_query_array(name) else "block"
        assert group[name].shape[0] == counts[kind], name


def test_read_query_returns_the_backbone_features(store, manifest):
    extractor = FakeExtractor()
    for query in (0, manifest.num_rows - 1):
        row = manifest.slice(query, 1).to_pylist()[0]
        question = extractor.question_for(row["text"], row["is_sentence"])
        expected = extractor.extract([Image.open(row["image_path"])], [[question]])[0]
        sample = store.read_query(query, LAYER)
        assert set(sample) == {
            "image_states",
            "text_states",
            "sam_embedding",
            "original_size",
            "input_size",
            "image_index",
            "query_id",
        }
        assert sample["query_id"] == query
        assert sample["image_states"].dtype == np.float16 and sample["image_states"].shape == (576, 16)
        assert sample["text_states"].shape == (extractor.num_text_tokens(question), 16)
        assert sample["sam_embedding"].shape == (256, 64, 64)
        np.testing.assert_array_equal(sample["image_states"], expected.image_states[LAYER].numpy().astype(np.float16))
        np.testing.assert_array_equal(sample["text_states"], expected.text_states[0][LAYER].numpy().astype(np.float16))
        np.testing.assert_array_equal(sample["sam_embedding"], expected.sam_embedding.numpy().astype(np.float16))
        assert tuple(sample["original_size"]) == (row["height"], row["width"]) == expected.original_size
        assert tuple(sample["input_size"]) == expected.input_size


def test_text_states_are_zero_padded_and_images_shared(store):
    text = store.array("queries/text_l14")[:]
    for query, length in enumerate(store.text_len):
        assert not text[query, length:].any()
        assert text[query, length - 1].any()
    image = store.read_image(int(store.image_index[-1]), LAYER)
    assert image["query_ids"][-1] == store.num_queries - 1
    np.testing.assert_array_equal(image["image_states"], store.read_query(store.num_queries - 1, LAYER)["image_states"])


def test_reader_metadata_and_pickle(store, manifest):
    # The extractor's identity plus what the store holds for the head's warm start (the fake: nothing).
    no_warm_start = {"layers": None, "reason": "no warm start for layer 14: the fake backbone has no decoder layers"}
    assert store.identity == {**FakeExtractor().identity, "warm_start": no_warm_start}
    assert store.layers == (14,) and store.hidden_size == 16
    assert store.manifest.num_rows == manifest.num_rows
    assert missing_blocks(store) == [] and store.done_flags()[2]
    assert list(store.valid_query_ids()) == list(range(store.num_queries))
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers reopen by URL
    np.testing.assert_array_equal(clone.read_query(1, LAYER)["text_states"], store.read_query(1, LAYER)["text_states"])
    with pytest.raises(MissingLayerError, match=r"caches layer\(s\) \[14\], not 30$"):
        store.read_query(0, 30)
    assert verify_store(store.url).ok


def test_open_refuses_missing_foreign_and_incomplete(store, tmp_path):
    with pytest.raises(StoreError, match="no feature store at"):
        FeatureStore.open(tmp_path / "nothing")
    zarr.open_group(str(tmp_path / "foreign"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match="not a lens feature store"):
        FeatureStore.open(tmp_path / "foreign")

    group = open_group(store.location, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    try:
        group.attrs.put({ATTRS_KEY: {**attrs, "complete": False}})
        group["blocks/done"][1] = 0
        with pytest.raises(StoreError) as error:
            FeatureStore.open(store.url)
        message = str(error.value)
        assert "\n" not in message
        assert message == (
            f"store {store.url} is incomplete (2/3 blocks): rerun the same `lens-cache build` command to finish it"
        )
        partial = FeatureStore.open(store.url, require_complete=False)
        assert missing_blocks(partial) == [1] and not partial.done_flags()[1]
        assert not verify_store(store.url).ok

        group.attrs.put({ATTRS_KEY: {**attrs, "format_version": 99}})
        with pytest.raises(StoreError, match="format version 99"):
            FeatureStore.open(store.url)
    finally:
        group["blocks/done"][1] = 1
        group.attrs.put({ATTRS_KEY: attrs})
    assert FeatureStore.open(store.url).complete


def test_format_version_1_reads_as_256_channels_without_warm_start(store):
    """Version 1 recorded neither sam_channels nor a warm start: every SAM then had 256 channels."""
    group = open_group(store.location, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    identity = {key: value for key, value in attrs["identity"].items() if key != "warm_start"}
    old = {key: value for key, value in attrs.items() if key not in ("sam_channels", "checksums")}
    old.update(format_version=1, identity=identity, identity_hash=identity_hash(identity))
    try:
        group.attrs.put({ATTRS_KEY: old})
        v1 = FeatureStore.open(store.url)
        assert v1.sam_channels == 256 and v1.warm_start["layers"] is None and v1.warm_start_bytes() is None
        # No checksums in version 1: samples read unchecked, without a word.
        assert v1.checksums is None and v1.block_checksums(0) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(v1.read_query(0, LAYER)["sam_embedding"], store.read_query(0, LAYER)["sam_embedding"])
        report = verify_store(store.url)
        assert report.ok and report.notes == ["format version 1 has no checksums: values were decoded, not compared"]
    finally:
        group.attrs.put({ATTRS_KEY: attrs})


def test_check_compatible(manifest, store, tmp_path):
    same_backbone = build_cache(
        manifest.slice(0, 3), tmp_path / "subset", fake_factory(), spec="testset:val", block_size=2, progress=False
    )
    check_compatible([store, same_backbone])  # manifests may differ
    other = build_cache(
        manifest,
        tmp_path / "other",
        fake_factory(prompt_template="Q: {question} A:"),
        spec="testset:val",
        progress=False,
    )
    with pytest.raises(StoreError, match=r"different backbones \(prompt_template"):
        check_compatible([store, other])
    # The layers a store keeps do not change its features: whether a run's layer is in every
    # store is require_layer's question (tests/test_feature_compatibility.py).
    layers = build_cache(
        manifest, tmp_path / "layers", fake_factory(layers=(14, 30)), spec="testset:val", progress=False
    )
    check_compatible([store, layers])


@pytest.mark.parametrize("url", ["memory://lens-cache-test/store", "file://{tmp}/store"])
def test_fsspec_urls(manifest, tmp_path, url):
    url = url.format(tmp=tmp_path)
    built = build_cache(manifest, url, fake_factory(), spec="testset:val", block_size=2, progress=False)
    reopened = FeatureStore.open(url)
    assert reopened.url == url and reopened.complete
    assert reopened.manifest.num_rows == manifest.num_rows
    np.testing.assert_array_equal(
        reopened.read_query(2, LAYER)["text_states"], built.read_query(2, LAYER)["text_states"]
    )
    assert verify_store(url).ok


def test_bitround_is_smaller_and_close(manifest, store, tmp_path):
    rounded = build_cache(
        manifest,
        tmp_path / "bitround",
        fake_factory(),
        spec="testset:val",
        block_size=2,
        compression="bitround",
        progress=False,
    )
    assert rounded.attrs["compression"] == "bitround"
    assert [type(f).__name__ for f in rounded.array("images/sam").filters] == ["BitRound"]
    for name in ("images/sam", "images/mllm_l14"):
        assert rounded.location.bytes_under(name) < 0.95 * store.location.bytes_under(name)
        exact, lossy = store.array(name)[:].astype(np.float32), rounded.array(name)[:].astype(np.float32)
        # keepbits=7 of float16's 10 mantissa bits: relative error <= 2**-8 (subnormals: absolute)
        np.testing.assert_allclose(lossy, exact, rtol=2**-7, atol=1e-6)
        assert not np.array_equal(lossy, exact)
    assert verify_store(rounded.url).ok  # the checksums are of the rounded values: what reads back


#: What verify and the readers say about image 0's SAM chunk after each kind of damage.
DAMAGE_FOUND = {
    "deleted": "its chunk is missing",
    "truncated": "its chunk does not decode (RuntimeError: Zstd decompression error",
    "flipped": "checksum mismatch, its bytes changed",
}


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_chunk_is_found_by_verify_and_refused_by_the_reader(store, tmp_path, kind):
    """Issue 11: a deleted, truncated or byte-flipped chunk passed verify and read as zeros / other values."""
    copy = tmp_path / "store"
    shutil.copytree(store.location.local_path, copy)
    damage_chunk(copy / "images" / "sam" / "c" / "0" / "0" / "0" / "0", kind)  # image 0 (block 0)

    report = verify_store(copy)
    assert not report.ok and report.damaged_blocks == [0]
    assert report.problems[0].startswith(f"block 0: image 0: images/sam: {DAMAGE_FOUND[kind]}")
    assert report.problems[-1] == (
        f"1 damaged block(s) [0]: repair it by rerunning the `lens-cache build ... --out {copy}` command that made "
        "it (it recomputes only the damaged blocks)"
    )
    quick = verify_store(copy, quick=True)  # --quick: structure only (the chunk's folder is still listed)
    assert quick.ok and quick.quick and list(quick.lines())[-1].startswith("OK (structure only: no value was read")

    damaged = FeatureStore.open(copy)
    with pytest.raises(DamagedStoreError) as error:
        damaged.read_query(0, LAYER)
    message = str(error.value)
    assert "\n" not in message and error.value.block == 0
    assert message.startswith(f"store {copy}: image 0 is damaged (images/sam: {DAMAGE_FOUND[kind]}")
    assert message.endswith(f"rerunning the `lens-cache build ... --out {copy}` command that made it (it recomputes only the damaged blocks)")
    other = int(damaged.first_query[2])  # block 1 is intact and reads as before
    np.testing.assert_array_equal(damaged.read_query(other, LAYER)["text_states"], store.read_query(other, LAYER)["text_states"])


def test_damaged_bookkeeping_and_manifest_are_found(store, tmp_path):
    """Sizes, failure codes, index arrays and manifest.parquet are checked too, not only the features."""
    copy = tmp_path / "store"
    shutil.copytree(store.location.local_path, copy)
    damage_chunk(copy / "images" / "original_size" / "c" / "1" / "0", "deleted")  # block 1's image sizes
    zarr.open_array(str(copy / "queries" / "text_len"), mode="r+")[0] = 99  # valid zstd, other values
    (copy / "manifest.parquet").write_bytes(store.location.read_bytes("manifest.parquet")[:-20] + b"x" * 20)

    report = verify_store(copy)
    assert not report.ok
    assert any(p.startswith("manifest.parquet unreadable") for p in report.problems)
    assert "queries/text_len: checksum mismatch, its bytes changed" in report.problems
    damaged = FeatureStore.open(copy)
    with pytest.raises(DamagedStoreError, match=r"manifest.parquet is unreadable .*: repair it by rerunning"):
        damaged.manifest  # noqa: B018
    with pytest.raises(DamagedStoreError, match=r"queries/text_len is damaged \(checksum mismatch\)"):
        damaged.text_len  # noqa: B018

    shutil.rmtree(copy)
    shutil.copytree(store.location.local_path, copy)
    damage_chunk(copy / "images" / "original_size" / "c" / "1" / "0", "deleted")
    report = verify_store(copy)
    assert report.damaged_blocks == [1]
    assert "block 1: block 1 (images 2-3): its image sizes or failure codes changed (checksum mismatch)" in report.problems
    with pytest.raises(DamagedStoreError, match=r"block 1 \(images 2-3\) is damaged"):
        FeatureStore.open(copy).read_image(2, LAYER)
