"""The shipped toy backbones: intact, loadable through the real loaders, and as good as recorded.

``cache/lens_cache/backbones/toy_weights/MANIFEST.json`` records each file's sha256 and the held-out scores
measured at export, including a ``quick`` check on the first few held-out scenes that
this test recomputes (the models are deterministic on the CPU, so the numbers must agree).
"""

from __future__ import annotations

import json

import pytest
import torch

from lens_cache.backbones.toy import MANIFEST_FILE, TOY_LLAVA_DIR, TOY_SAM_FILE, WEIGHTS_DIR
from lens_core.files import sha256_file
from lens_toy.export import load_toy_llava, load_toy_sam, read_manifest, verify_weights

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / MANIFEST_FILE).is_file(), reason="no shipped toy weights")


def test_every_shipped_file_matches_its_manifest_hash():
    manifest = read_manifest()
    assert {TOY_SAM_FILE, f"{TOY_LLAVA_DIR}/model.safetensors", f"{TOY_LLAVA_DIR}/config.json"} <= set(manifest["files"])
    assert verify_weights() == []
    assert manifest["command"] and manifest["commit"]
    total = sum(meta["bytes"] for meta in manifest["files"].values())
    assert total < 25 * 2**20


def test_damaged_weights_are_detected(tmp_path):
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, copy)
    data = bytearray((copy / TOY_SAM_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / TOY_SAM_FILE).write_bytes(bytes(data))
    assert verify_weights(copy) == [TOY_SAM_FILE]


def test_shipped_sam_scores_what_the_manifest_records():
    from lens_toy.sam import evaluate_sam

    quick = read_manifest()["held_out"]["quick"]["sam"]
    scores = evaluate_sam(load_toy_sam(), scenes=quick["scenes"])
    assert scores["single_point_miou"] == pytest.approx(quick["single_point_miou"], abs=1e-4)
    assert scores["single_point_miou"] > 0.7  # far above a disk around the point (~0.3)


def test_shipped_llava_scores_what_the_manifest_records():
    from lens_toy.llava import evaluate_llava

    quick = read_manifest()["held_out"]["quick"]["llava"]
    scores = evaluate_llava(*load_toy_llava(), scenes=quick["scenes"], boxes=False)
    for key in ("acc_colour", "acc_yesno"):
        assert scores[key] == pytest.approx(quick[key], abs=1e-6)
    assert scores["pointing_game_by_layer"] == pytest.approx(quick["pointing_game_by_layer"], abs=1e-3)


def test_toy_specs_load_through_the_real_loaders():
    """``--mllm toy`` is LlavaBackbone.from_pretrained on the shipped folder; ``--sam toy`` a strict load."""
    from lens_cache.backbones import build_mllm, build_sam, sam_identity

    mllm = build_mllm("toy", layers=(3,), device="cpu")
    assert mllm.identity["name_or_path"] == "toy"
    assert mllm.identity["weights_sha256"] == sha256_file(WEIGHTS_DIR / TOY_LLAVA_DIR / "model.safetensors")
    sam = build_sam("toy")
    assert sam.prompt_encoder.embed_dim == 64
    assert sam_identity("toy")["weights"] == "sha256:" + sha256_file(WEIGHTS_DIR / TOY_SAM_FILE)
    reference = load_toy_sam()
    for (name, a), (_, b) in zip(sam.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((WEIGHTS_DIR / TOY_LLAVA_DIR / "config.json").read_text())["model_type"] == "llava"


LENS_HEAD_FILES = ("lens_head/config.json", "lens_head/model.safetensors", "lens_head/README.md")


@pytest.mark.skipif(not (WEIGHTS_DIR / "lens_head").is_dir(), reason="no shipped toy LENS head")
def test_shipped_lens_head_is_recorded_and_scores_what_the_manifest_records(tmp_path):
    """The toy LENS head (``Segmenter.from_pretrained("toy")``): hashed with the backbones (the first test checks
    the hashes), its provenance recorded, and its quick held-out check recomputed (``tests/helpers/toy_head.py``)."""
    from lens_train.testing import small_synthetic
    from tests.helpers.toy_head import QUICK_IMAGES, quick_scores

    manifest = read_manifest()
    assert set(LENS_HEAD_FILES) <= set(manifest["files"])
    head = manifest["lens_head"]
    assert head["command"] and head["commit"] and head["seed"] == 0 and head["export"].startswith("lens-export-model")
    held_out = head["held_out"]
    assert held_out["giou"] > held_out["baselines"]["whole_image"]["giou"]
    config = json.loads((WEIGHTS_DIR / "lens_head" / "config.json").read_text())
    assert config["identity"]["weights_sha256"] == manifest["files"][f"{TOY_LLAVA_DIR}/model.safetensors"]["sha256"]
    quick = held_out["quick"]
    scores = quick_scores(small_synthetic(tmp_path / "synthetic", images=QUICK_IMAGES))
    assert scores["queries"] == quick["queries"]
    assert scores["giou"] == pytest.approx(quick["giou"], abs=1e-4)
    assert scores["ciou"] == pytest.approx(quick["ciou"], abs=1e-4)
