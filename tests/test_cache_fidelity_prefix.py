"""The prompt's tokens before the image (BOS, system prompt, "USER:"): the states the LENS authors' head reads
with the rest of the sequence, returned by ``encode`` and stored once per layer, against a plain full forward
(tiny models, CPU, float32)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lens_cache.backbones import build_extractor, build_mllm
from lens_cache.build import build_cache
from lens_cache.errors import MissingLayerError
from lens_cache.store import FeatureStore, verify_store
from lens_cache.testing import fake_factory, make_test_manifest
from tests.helpers.images import padded_squares

ATOL = 1e-5
QUESTION = "Can you segment the red circle in this image?"


def _full_forward(backbone, image, question):
    """Plain full forward of the whole prompt through the processor (the model's own positions,
    M-RoPE included): (input_ids (S,), hidden_states)."""
    inputs = backbone.processor(text=backbone.prompt_for(question), images=image, return_tensors="pt")
    with torch.inference_mode():
        out = backbone.model(**inputs, output_hidden_states=True)
    return inputs["input_ids"][0], out.hidden_states


# Each family: its tiny model, the layers cached, what the prefix must end with.
FAMILIES = {
    "tiny": ((14, 30), "user:"),  # LLaVA-1.5: <s> system prompt USER:
    "tiny-qwen2vl": ((20, 27), "<|vision_start|>"),  # Qwen2-VL: ... <|im_start|>user\n<|vision_start|>
    "tiny-onevision": ((20, 27), "user"),  # OneVision: <|im_start|>user
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefix_states_equal_a_full_forward_and_do_not_depend_on_the_image(name):
    layers, last = FAMILIES[name]
    backbone = build_mllm(name, layers=layers, device="cpu", dtype=torch.float32)
    squares = padded_squares()
    encoded = backbone.encode(squares, [[QUESTION], []])
    prefix = backbone.prefix_token_ids
    p = len(prefix)
    tokens = backbone.processor.tokenizer.convert_ids_to_tokens(prefix)
    assert p > 1 and "".join(tokens[-2:]).lower().replace("ġ", "").replace("ċ", "").endswith(last.replace("\n", ""))
    for image, states in zip(squares, encoded):
        input_ids, hidden = _full_forward(backbone, image, QUESTION)
        assert input_ids[:p].tolist() == prefix
        assert int(input_ids[p]) == backbone.image_token_id  # the first image token follows the prefix
        assert sorted(states.prefix_states) == list(layers)
        for k in layers:
            assert states.prefix_states[k].shape == (p, backbone.hidden_size)
            assert states.prefix_states[k].dtype == torch.float32 and states.prefix_states[k].device.type == "cpu"
            torch.testing.assert_close(states.prefix_states[k], hidden[k][0, :p], atol=ATOL, rtol=0)
    # a full forward of the other image gives the same prefix states (the decoder is causal)
    _, other = _full_forward(backbone, squares[1], QUESTION)
    _, first = _full_forward(backbone, squares[0], QUESTION)
    for k in layers:
        torch.testing.assert_close(other[k][0, :p], first[k][0, :p], atol=1e-6, rtol=0)
        assert torch.equal(encoded[0].prefix_states[k], encoded[1].prefix_states[k])


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    manifest = make_test_manifest(tmp_path_factory.mktemp("images"), num_images=3, seed=5)
    factory = functools.partial(build_extractor, mllm="tiny", sam="tiny", layers=(14, 30), device="cpu", dtype="float32")
    out = tmp_path_factory.mktemp("stores") / "tiny"
    return build_cache(manifest, out, factory, spec="testset:val", block_size=2, batch_size=2, progress=False)


def test_the_store_keeps_the_prefix_once_per_layer_equal_to_a_full_forward(tiny_store):
    store = FeatureStore.open(tiny_store.url)
    backbone = build_mllm("tiny", layers=(14, 30), device="cpu", dtype=torch.float32)
    assert store.prefix_token_ids == backbone.prefix_token_ids
    assert store.attrs["prefix"] == {"length": len(backbone.prefix_token_ids), "token_ids": backbone.prefix_token_ids}
    p = len(backbone.prefix_token_ids)
    names = [name for name in store.array_names() if name.startswith("prefix/")]
    assert names == ["prefix/mllm_l14", "prefix/mllm_l30"]  # once per layer, not per image
    _, hidden = _full_forward(backbone, padded_squares()[0], QUESTION)
    for k in (14, 30):
        values = store.prefix_states(k)
        assert values.dtype == np.float32 and values.shape == (p, store.hidden_size)
        assert str(store.array(f"prefix/mllm_l{k}").dtype) == "float16"  # the store's feature dtype
        expected = hidden[k][0, :p].numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(values, expected, atol=1e-3, rtol=1e-3)  # float16 storage
        np.testing.assert_allclose(values, hidden[k][0, :p].numpy(), atol=ATOL + np.abs(expected).max() * 2**-10)
    with pytest.raises(MissingLayerError, match="not 3"):
        store.prefix_states(3)
    assert verify_store(store.url).ok
    from typer.testing import CliRunner

    from lens_cache.cli import app

    info = CliRunner().invoke(app, ["info", store.url])
    assert f"prefix       {p} tokens before the image, stored once per layer" in info.stdout


def test_damaged_prefix_is_found_by_verify_and_repaired_by_the_build(tmp_path):
    manifest = make_test_manifest(tmp_path / "images", num_images=3, seed=5)
    factory = fake_factory(layers=(3,), hidden_size=8, prefix_tokens=5)
    store = build_cache(manifest, tmp_path / "s", factory, spec="testset:val", block_size=2, progress=False)
    good = store.prefix_states(3)
    assert good.shape == (5, 8) and store.prefix_token_ids == [1, 2, 3, 4, 5]
    import zarr

    zarr.open_group(str(tmp_path / "s"), mode="r+")["prefix/mllm_l3"][0, 0] = 7.0
    report = verify_store(str(tmp_path / "s"))
    assert not report.ok and any("prefix/mllm_l3" in problem for problem in report.problems)
    rebuilt = build_cache(manifest, tmp_path / "s", factory, spec="testset:val", block_size=2, progress=False)
    np.testing.assert_array_equal(rebuilt.prefix_states(3), good)
    assert verify_store(str(tmp_path / "s")).ok


def test_a_store_without_prefix_reads_none(tmp_path):
    """A store of format version 3 (no ``prefix`` attribute, no ``prefix/`` group) still opens and verifies;
    so does a store whose backbone gives no prefix states."""
    import zarr

    from lens_cache.identity import identity_hash
    from lens_cache.store import ATTRS_KEY

    manifest = make_test_manifest(tmp_path / "images", num_images=3, seed=5)
    store = build_cache(manifest, tmp_path / "s", fake_factory(), spec="testset:val", block_size=2, progress=False)
    assert store.prefix_states(14) is None and store.prefix_token_ids is None
    group = zarr.open_group(str(tmp_path / "s"), mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    del attrs["prefix"]
    attrs["format_version"] = 3
    assert attrs["identity_hash"] == identity_hash(attrs["identity"])
    group.attrs.put({ATTRS_KEY: attrs})
    old = FeatureStore.open(str(tmp_path / "s"))
    assert old.attrs["format_version"] == 3
    assert old.prefix_states(14) is None and old.prefix_token_ids is None
    assert verify_store(str(tmp_path / "s")).ok
