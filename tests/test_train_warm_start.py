"""The warm start at the run level (issue 22 item 7): a run's head begins as the MLLM's decoder layers k and k+1
that its store holds. Removing the trainer's ``load_decoder_layers`` call used to leave every trainer, evaluation
and reproduction test passing; this one fails then.

One training step, warm start on (the tiny preset leaves it off), with a learning rate of 0 (AdamW then changes nothing: no weight decay at the tiny preset) on the
store of the tiny real run; the saved head's two layers must equal the store's warm-start file tensor for tensor.
"""

from __future__ import annotations

import torch
from lens_cache.store import FeatureStore
from safetensors.torch import load_file

from lens_train.training.presets import load_preset
from lens_train.training.stores import read_warm_start
from lens_train.training.trainer import TrainRequest, train

from tests.helpers.tiny_real_run import TINY_REAL_LAYER


def test_a_runs_head_starts_as_the_stores_decoder_layers(tiny_real_run, tmp_path):
    out = tmp_path / "run"
    overrides = {"warm_start": True, "steps": 1, "lr": 0.0, "weight_decay": 0.0, "warmup_steps": 0, "batch_size": 1, "grad_accum": 1,
                 "num_workers": 0, "ckpt_every": 1, "log_every": 1}
    train(TrainRequest(caches=(tiny_real_run.store_url,), out=out, preset="tiny", train_overrides=overrides,
                       layer=TINY_REAL_LAYER, device="cpu", quiet=True))
    saved = load_file(out / "model.safetensors")
    warm = read_warm_start(FeatureStore.open(tiny_real_run.store_url), layer=TINY_REAL_LAYER,
                           config=load_preset("tiny").model)
    assert not isinstance(warm, str), warm
    compared = 0
    for index, state in enumerate(warm.state_dicts):
        for name, tensor in state.items():
            key = f"head.layers.{index}.{name}"
            assert key in saved, key
            torch.testing.assert_close(saved[key].float(), tensor.float(), rtol=0, atol=0, msg=key)
            compared += 1
    assert compared >= 2 * 9  # q, k, v, o, gate, up, down and two norms per layer
