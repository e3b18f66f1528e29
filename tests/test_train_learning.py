"""Learning on CPU: a few minutes of lens-train on a real tiny-backbone cache beat the untrained model and
the trivial baselines (whole image; the thresholded heatmap alone).

The store is the synthetic REFER set (4 images, 26 referring queries) cached with the real tiny LLaVA and
tiny SAM (random weights, built in code); the run is scored on the queries it was trained on. With random
backbones and a randomly initialised SAM decoder, a few hundred samples can fit a small set but do not
generalise to held-out images yet (README, "What learns on CPU"): this test shows that training learns,
not that the tiny model transfers.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

STEPS = 100


@pytest.fixture(scope="module")
def refer_store(tmp_path_factory):
    from lens_cache.backbones import build_extractor
    from lens_cache.build import build_cache
    from lens_manifests import build_manifest

    from lens_train.testing import small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=4)
    manifest = build_manifest("synthetic-refer:train", root)
    factory = functools.partial(build_extractor, mllm="tiny", sam="tiny", layers=(14,), device="cpu")
    return build_cache(manifest, str(tmp_path_factory.mktemp("store") / "refer"), factory,
                       spec="synthetic-refer:train", progress=False)


def _untrained_giou(run_dir, store_url: str) -> float:
    """gIoU of the same model before any update (same preset and seed as the run)."""
    from lens_core.metrics import giou_ciou

    from lens_train.data import QueryDataset, collate
    from lens_train.evaluate import predict
    from lens_train.trainer import build_model, configs_from_run, read_run_config

    model_config, train_config = configs_from_run(read_run_config(run_dir))
    model = build_model(model_config, "tiny", seed=train_config.seed).eval()
    dataset = QueryDataset(store_url, 14)
    preds, gts = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        _, logits = predict(model, collate([item]))
        preds.append((torch.sigmoid(logits[0]) > train_config.threshold).numpy())
        gts.append(item["gt"].numpy())
    return giou_ciou(preds, gts)[0]


def test_training_beats_untrained_and_trivial_baselines(refer_store, tmp_path):
    from lens_train.evaluate import evaluate
    from lens_train.trainer import TrainRequest, train

    run = tmp_path / "run"
    train(TrainRequest(caches=(refer_store.url,), out=run, preset="tiny", device="cpu", quiet=True,
                       train_overrides={"steps": STEPS, "num_workers": 0}))
    metrics = evaluate(run, refer_store.url, out=tmp_path / "eval", figures=2, log=lambda line: None)
    untrained = _untrained_giou(run, refer_store.url)
    whole, heatmap = metrics["baselines"]["whole_image"]["giou"], metrics["baselines"]["heatmap"]["giou"]
    summary = f"trained {metrics['giou']:.3f}, untrained {untrained:.3f}, whole image {whole:.3f}, heatmap {heatmap:.3f}"
    assert metrics["num_queries"] == refer_store.num_queries
    assert metrics["giou"] > untrained + 0.1, summary
    assert metrics["giou"] > 2 * max(whole, heatmap), summary
    assert np.isfinite(metrics["ciou"]) and metrics["ciou"] > max(
        metrics["baselines"]["whole_image"]["ciou"], metrics["baselines"]["heatmap"]["ciou"]), summary
