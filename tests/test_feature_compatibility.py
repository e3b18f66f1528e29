"""One rule for "are these features the run's?": training, lens-eval and lens-segment agree.

The rule is ``lens_cache.identity.feature_differences`` (the same weights at another path and
another set of cached layers are the same features; other weights are not) plus
``lens_cache.store.require_layer`` (the run's layer must be there). Each case below is put
to the three entry points: training mixes the run's store with the case's store
(``lens_train.training.trainer.prepare``), ``lens-eval`` evaluates the run on it, and ``lens-segment``
attaches the run to a live backbone of the case's identity.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lens_cache.errors import UserError
from lens_cache.identity import feature_differences, format_differences

WEIGHTS = {"name_or_path": "/models/llava-1.5-7b", "weights_fingerprint": "f" * 64}
#: case -> (identity fields, cached layers, None if every entry point accepts it, else what each refusal names)
CASES = {
    "same weights, another path and layer set": ({**WEIGHTS, "name_or_path": "/mnt/elsewhere/llava"}, (14, 30), None),
    "other weights": ({**WEIGHTS, "weights_fingerprint": "0" * 64}, (14,), "weights_fingerprint: 'ffff"),
    "the run's layer missing": (WEIGHTS, (30,), "caches layer(s) [30], not 14"),
}
ENTRY_POINTS = ("training", "evaluation", "segmentation")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-step tiny run on a store cached with identity WEIGHTS at layer 14, and one store per case."""
    from lens_manifests import build_manifest
    from lens_train.testing import build_store, small_synthetic
    from lens_train.training.trainer import TrainRequest, train

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=2)
    out = tmp_path_factory.mktemp("stores")
    run_store = build_store(build_manifest("synthetic:train", root), out / "run", spec="synthetic:train",
                            identity=WEIGHTS)
    reason = build_manifest("synthetic-reason:val", root)
    stores = {
        case: build_store(reason, out / f"case{i}", spec="synthetic-reason:val", identity=identity, layers=layers).url
        for i, (case, (identity, layers, _)) in enumerate(CASES.items())
    }
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train(TrainRequest(caches=(run_store.url,), out=run_dir, preset="tiny", device="cpu", quiet=True,
                       train_overrides={"steps": 2, "batch_size": 2, "grad_accum": 1, "num_workers": 0,
                                        "warmup_steps": 1}))
    image = reason.column("image_path")[0].as_py()
    return {"run_store": run_store.url, "run_dir": run_dir, "stores": stores, "image": image}


def _training(world, case: str, tmp_path: Path) -> None:
    from lens_train.training.trainer import TrainRequest, prepare

    request = TrainRequest(caches=(world["run_store"], world["stores"][case]), out=tmp_path / "train", preset="tiny",
                           device="cpu", quiet=True)
    prepare(request, lambda line: None)


def _evaluation(world, case: str, tmp_path: Path) -> None:
    from lens_train.evaluation.evaluate import evaluate

    evaluate(world["run_dir"], world["stores"][case], out=tmp_path / "eval", limit=1, figures=0, log=lambda line: None)


def _segmentation(world, case: str, tmp_path: Path) -> None:
    from lens_train.inference.segmenter import Segmenter
    from lens_train.testing import fake_tiny_extractor

    identity, layers, _ = CASES[case]
    live = fake_tiny_extractor(identity=identity, layers=layers)
    segmenter = Segmenter(world["run_dir"], extractor=live, device="cpu")
    segmenter.segment(world["image"], "the red circle")


def _outcome(entry_point: str, world, case: str, tmp_path: Path) -> str | None:
    """None when ``entry_point`` accepts the case, else its one-line refusal."""
    check = {"training": _training, "evaluation": _evaluation, "segmentation": _segmentation}[entry_point]
    try:
        check(world, case, tmp_path)
    except UserError as error:
        message = str(error)
        assert "\n" not in message
        return message
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_training_evaluation_and_segmentation_accept_and_refuse_alike(world, case, tmp_path):
    refusal = CASES[case][2]
    outcomes = {entry: _outcome(entry, world, case, tmp_path / entry) for entry in ENTRY_POINTS}
    if refusal is None:
        assert outcomes == dict.fromkeys(ENTRY_POINTS)
    else:
        refused = {entry: message is not None and refusal in message for entry, message in outcomes.items()}
        assert refused == dict.fromkeys(ENTRY_POINTS, True), outcomes


def test_the_rule_by_field():
    base = {"backbone": "llava-hf", "config_hash": "c1", "compute_dtype": "float32", "prompt_template": "P",
            "sam": {"variant": "vit_h", "weights": "sha256:aa"}, "layers": [14], "warm_start": {"layers": [14, 15]}}
    # Without a fingerprint the path is the only name of the weights: it counts.
    assert feature_differences({**base, "name_or_path": "/a"}, {**base, "name_or_path": "/b"}) == [
        ("name_or_path", "/a", "/b")]
    # With one, it does not; nor do the cached layers and the warm-start record.
    ours = {**base, **WEIGHTS}
    theirs = {**ours, "name_or_path": "/b", "layers": [14, 30], "warm_start": {"layers": [30, 31]}}
    assert feature_differences(ours, theirs) == []
    # Everything else does, named by its flattened key.
    changed = {**ours, "compute_dtype": "bfloat16", "prompt_template": "Q", "sam": {**base["sam"], "weights": "sha256:bb"}}
    assert [key for key, _, _ in feature_differences(ours, changed)] == ["compute_dtype", "prompt_template", "sam.weights"]
    assert feature_differences(ours, {**ours, "weights_sha256": "ab"}) == [("weights_sha256", "<unset>", "ab")]


def test_differences_read_as_one_line():
    differences = [(f"k{i}", i, i + 1) for i in range(6)]
    assert format_differences(differences[:1], ("run", "store")) == "k0: 0 (run) vs 1 (store)"
    assert format_differences(differences[:2]) == "k0: 0 vs 1; k1: 1 vs 2"
    assert format_differences(differences).endswith("k3: 3 vs 4; and 2 more")
