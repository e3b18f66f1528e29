"""What a build holds besides its models (BENCHMARKS.md, stage 1 on the CPU, measures each at 7B).

The warm-start file is written from the MLLM's own weights, without a copy of them in memory: at
LLaVA-1.5-7B's dimensions the two warm-start layers are 1.6 GB in float32, and a build that held them as
bytes (``safetensors.torch.save``: its buffer and the ``bytes`` made from it) and as a state-dict copy held
three more copies beside the model at its peak. The question suffixes' copies of the prefix's key/value cache
stay within ``SUFFIX_CACHE_BYTES`` per forward. (SAM's banded attention: ``test_sam_attention.py``.)
"""

from __future__ import annotations

import hashlib

import pytest
import torch


@pytest.fixture()
def extractor(toy_sam_store):
    return toy_sam_store.extractor


def test_the_file_is_saved_from_the_models_own_tensors_with_the_bytes_save_gave(extractor, tmp_path, monkeypatch):
    import safetensors.torch
    from lens_cache.warm_start import warm_start_file

    layers = extractor.mllm.model.model.language_model.layers
    own = {p.data_ptr() for index in (14, 15, 30, 31) for p in layers[index].parameters()}
    handed: list[int] = []
    real_save_file = safetensors.torch.save_file

    def spying_save_file(tensors, filename, metadata=None):
        handed.extend(t.data_ptr() for t in tensors.values())
        return real_save_file(tensors, filename, metadata)

    def no_bytes(*_, **__):
        raise AssertionError("the warm start was built as bytes in memory")

    monkeypatch.setattr(safetensors.torch, "save_file", spying_save_file)
    monkeypatch.setattr(safetensors.torch, "save", no_bytes)
    record = warm_start_file(extractor, tmp_path / "w.safetensors")
    assert handed and set(handed) == own  # views of the MLLM's parameters, not copies
    # The same bytes as before the streaming write: stores built before keep their warm-start hash.
    monkeypatch.undo()
    copies = {f"decoder.{i}.{k}": v.clone() for i in (14, 15, 30, 31) for k, v in layers[i].state_dict().items()}
    before = safetensors.torch.save(copies)
    assert (tmp_path / "w.safetensors").read_bytes() == before
    assert record["sha256"] == hashlib.sha256(before).hexdigest()
    # The record alone (no path): a temporary file, the same hash.
    assert warm_start_file(extractor) == record


def test_a_remote_store_gets_the_file_uploaded_and_a_wrong_record_writes_nothing(extractor, tmp_path):
    import fsspec
    from lens_cache.store_format import WARM_START_FILE
    from lens_cache.store_location import StoreLocation
    from lens_cache.warm_start import warm_start_file, write_warm_start

    record = warm_start_file(extractor)
    remote = StoreLocation("memory://lens-warm-start-test/store")
    write_warm_start(extractor, remote, record)
    assert hashlib.sha256(remote.read_bytes(WARM_START_FILE)).hexdigest() == record["sha256"]
    fsspec.filesystem("memory").rm("/lens-warm-start-test", recursive=True)

    local = StoreLocation(str(tmp_path / "store"))
    with pytest.raises(RuntimeError, match="is not the one the store records"):
        write_warm_start(extractor, local, {**record, "sha256": "0" * 64})
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []  # nothing half-written, no temporary
    write_warm_start(extractor, local, record)
    assert hashlib.sha256((tmp_path / "store" / WARM_START_FILE).read_bytes()).hexdigest() == record["sha256"]


def test_layer_weights_are_views_on_a_cpu_model_and_loading_them_does_not_touch_the_model(extractor):
    """The no-copy state dict is read, never written: loading it into a head copies."""
    from lens_core import LensConfig
    from lens_core.head import SegmentationHead
    from lens_train.training.presets import load_preset

    mllm = extractor.mllm
    state = mllm.decoder_layer_state_dict(14)
    layer = mllm.model.model.language_model.layers[14]
    assert state["self_attn.q_proj.weight"].data_ptr() == layer.self_attn.q_proj.weight.data_ptr()
    before = layer.self_attn.q_proj.weight.detach().clone()
    tiny = load_preset("tiny").model.to_dict()
    head = SegmentationHead(config=LensConfig.from_dict({**tiny, **mllm.head_sizes}))
    head.load_decoder_layers([state, mllm.decoder_layer_state_dict(15)])
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    assert torch.equal(layer.self_attn.q_proj.weight, before)


@pytest.mark.parametrize("mllm", ["tiny", "tiny-qwen2vl"])
def test_suffix_forwards_keep_their_cache_copies_within_the_budget(mllm, monkeypatch):
    """Each suffix row copies its image's prefix cache: with a budget of two rows' copies, the suffixes run two
    at a time (the shared base of every adapter), and the states are those of one forward of every row."""
    import lens_cache.backbones.prefix_sharing as sharing
    from lens_cache.backbones import build_mllm
    from PIL import Image

    backbone = build_mllm(mllm, layers=[3])
    squares = [Image.new("RGB", (1024, 1024), colour) for colour in ("red", "navy")]
    questions = [[backbone.question_for(t, False) for t in ("circle", "red square", "the big star")],
                 [backbone.question_for("the shape that is round", True)]]
    lm = backbone.model.model.language_model
    calls: list[int] = []
    hook = lm.layers[0].register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    try:
        whole = backbone.encode(squares, questions)
        config, width = lm.config, next(lm.parameters()).element_size()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        one_row = 2 * 3 * heads * len(backbone._prefix_ids) * head_dim * width  # keys + values, layers 1..3
        monkeypatch.setattr(sharing, "SUFFIX_CACHE_BYTES", 2 * one_row + one_row // 2)
        calls.clear()
        budgeted = backbone.encode(squares, questions)
    finally:
        hook.remove()
    assert calls == [2, 2, 2]  # both prefixes, then the four suffixes two at a time (one forward before)
    for b, qs in enumerate(questions):
        for q in range(len(qs)):
            torch.testing.assert_close(budgeted[b].text_states[q][3], whole[b].text_states[q][3], atol=1e-5, rtol=0)
