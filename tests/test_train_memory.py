"""Counting a training step's memory on the CPU (lens_train.training.memory, benchmarks/bench_train_memory.py).

The counter is checked against arithmetic on hand-made allocations, the skipped products against
the computed ones (same peak, same kinds), and the kinds against the model's own sizes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lens_train.training.memory import LiveBytes, StepShape, measure_step_memory, synthetic_batch
from lens_train.training.presets import load_preset
from lens_train.training.loading import build_model
from lens_train.training.trainer import cast_for_training, forward_backward


def test_live_bytes_counts_storages_once_until_freed():
    with LiveBytes() as live:
        a = torch.ones(1000)               # 4000 bytes
        view = a.view(10, 100)[2:]         # a view: no new storage
        b = torch.ones(2000, dtype=torch.float64)  # 16000 bytes: the peak is here, 20000
        del a, view
        c = torch.ones(500, dtype=torch.bfloat16)  # 1000 bytes, after a is freed
        held = live.serial(b)
    assert live.peak == 4000 + 16000
    assert sorted(live.at_peak.values()) == [4000, 16000] and held in live.at_peak
    assert live._total == 16000 + 1000
    del b, c


def test_skipped_products_leave_the_count_unchanged():
    """The tiny preset's step with its products computed and skipped: the same peak, byte for byte."""
    preset = load_preset("tiny")
    counts = {}
    for skip in (False, True):
        torch.manual_seed(0)
        model = cast_for_training(build_model(preset.model, "tiny", seed=0), preset.train.precision)
        counts[skip] = measure_step_memory(preset, model, StepShape(batch_size=2), skip_compute=skip)
    assert counts[True].peak_bytes == counts[False].peak_bytes
    assert counts[True].by_kind == counts[False].by_kind


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_kinds_match_the_model_and_grow_with_the_batch(precision):
    import dataclasses

    preset = load_preset("tiny")
    preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, precision=precision))
    estimates = []
    for batch in (1, 3):
        model = cast_for_training(build_model(preset.model, "tiny", seed=0), precision)
        estimates.append(measure_step_memory(preset, model, StepShape(batch_size=batch), skip_compute=True))
    params = model.trainable_parameters()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    assert {p.dtype for p in params} == {torch.bfloat16 if precision == "bf16-pure" else torch.float32}
    one, three = estimates
    assert one.by_kind["parameters"] == param_bytes
    assert one.trainable_parameters == sum(p.numel() for p in params)
    # AdamW's two moments, in the parameters' dtype, for each parameter that gets a gradient (not the IoU head
    # of a preset that leaves it untrained), are alive at every moment of the second step
    batch = synthetic_batch(StepShape(batch_size=1), hidden_size=model.config.hidden_size,
                            sam_channels=model.config.prompt_dim, dtype=params[0].dtype)
    forward_backward(model, batch, preset.train, contextlib.nullcontext())
    updated_bytes = sum(p.numel() * p.element_size() for p in params if p.grad is not None)
    assert 0 < updated_bytes < trainable_bytes
    assert one.by_kind["optimizer"] in (0, 2 * updated_bytes)
    assert 0 <= one.by_kind["gradients"] <= trainable_bytes
    assert sum(one.by_kind.values()) == one.peak_bytes
    assert three.by_kind["activations"] > 2 * one.by_kind["activations"] > 0
    assert three.peak_bytes > one.peak_bytes
