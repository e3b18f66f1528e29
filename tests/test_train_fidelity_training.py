"""The training switches where the paper's text and the authors' code differ (row 9 of the fidelity table):
lr schedule, warm-up, gradient clipping, precision; the official preset follows the authors' code, its
fp32-master variant is asked for by name only, and run folders written before the switches load as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lens_train.training.trainer as trainer_module
from lens_train.errors import UserError
from lens_train.training.config import TrainConfig
from lens_train.training.presets import load_preset, preset_for_mllm
from lens_train.training.run_config import read_run_config
from lens_train.training.trainer import TrainRequest, lr_at, train

FORMAT_1 = Path(__file__).parent / "data" / "run-config-format1.json"
#: one optimizer step per micro-batch, no workers: a step of the tiny preset costs well under a second
FAST = {"batch_size": 1, "grad_accum": 1, "num_workers": 0, "log_every": 1, "warmup_steps": 0, "lr_schedule": "constant"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from lens_manifests import build_manifest

    from lens_train.testing import build_store, small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=2)
    return build_store(build_manifest("synthetic-reason:val", root), tmp_path_factory.mktemp("store") / "s",
                       spec="synthetic-reason:val").url


def _train(store: str, out: Path, **overrides) -> None:
    train(TrainRequest(caches=(store,), out=out, preset="tiny", train_overrides={**FAST, **overrides}, device="cpu",
                       quiet=True))


def _tiny(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**load_preset("tiny").train.to_dict(), **changes})


# ----------------------------------------------------------------------------- the lr schedule


def test_constant_schedule_keeps_the_lr_at_every_step():
    config = _tiny(lr_schedule="constant", warmup_steps=0, steps=150)
    assert [lr_at(step, config) for step in (0, 1, 149, 150, 10**6)] == [config.lr] * 5
    warm = _tiny(lr_schedule="constant", warmup_steps=4, steps=150)  # a warm-up still comes first
    assert [lr_at(step, warm) for step in (0, 3, 4, 10**6)] == [warm.lr / 4, warm.lr, warm.lr, warm.lr]


def test_linear_schedule_is_what_it_always_was_and_cosine_ends_at_zero():
    linear = _tiny(steps=100, warmup_steps=10)
    assert linear.lr_schedule == "linear"  # the default: presets and run folders without the key
    before = [linear.lr * (s + 1) / 10 if s < 10 else linear.lr * max(0.0, (100 - s) / 90) for s in range(0, 120)]
    assert [lr_at(s, linear) for s in range(0, 120)] == before
    cosine = _tiny(steps=100, warmup_steps=0, lr_schedule="cosine")
    assert lr_at(0, cosine) == cosine.lr and lr_at(50, cosine) == pytest.approx(cosine.lr / 2)
    assert lr_at(100, cosine) == pytest.approx(0.0) and lr_at(10**6, cosine) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- the config


def test_the_switches_validate_and_the_unknown_key_check_stays():
    assert _tiny(grad_clip=None).grad_clip is None and not _tiny(grad_clip=None).clips
    assert not _tiny(grad_clip=0.0).clips and _tiny(grad_clip=1.0).clips  # 0 = off, as before
    assert _tiny(precision="bf16-pure").precision == "bf16-pure"
    for bad, words in [({"grad_clip": -1.0}, "grad_clip"), ({"precision": "fp16"}, "precision"),
                       ({"lr_schedule": "step"}, "lr_schedule"), ({"warmup_steps": -1}, "warmup_steps"),
                       ({"attn_target_resize": "bilinear"}, "attn_target_resize"),
                       ({"lr_scheduler": "constant"}, "unknown TrainConfig keys ['lr_scheduler']")]:
        with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
            _tiny(**bad)


def test_a_run_folder_written_before_the_switches_means_what_it_meant(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(FORMAT_1.read_bytes())
    config = read_run_config(run)
    train_config = config.train
    assert (train_config.lr_schedule, train_config.warmup_steps, train_config.grad_clip, train_config.precision,
            train_config.attn_target_resize) == ("linear", 30, 1.0, "fp32", "area")
    assert lr_at(599, train_config) == pytest.approx(train_config.lr / 570)  # still decays linearly
    # Written back, its training section is the one it was read from (no key it did not have) ...
    assert json.loads(config.to_json())["train"] == json.loads(FORMAT_1.read_text())["train"]
    # ... while a run of the new switches records them, and reads back the same.
    import dataclasses

    from lens_train.training.run_config import RunConfig

    new = dataclasses.replace(config, train=_tiny(lr_schedule="constant", grad_clip=None, precision="bf16-pure",
                                                  attn_target_resize="nearest"))
    written = json.loads(new.to_json())["train"]
    assert (written["lr_schedule"], written["grad_clip"], written["precision"], written["attn_target_resize"]) == (
        "constant", None, "bf16-pure", "nearest")
    assert RunConfig.from_dict(json.loads(new.to_json())) == new


# ----------------------------------------------------------------------------- the presets


def test_official_preset_trains_as_the_authors_code():
    """jiazhen-code/LENS at 29c4959 (train.py, configs/default.yaml)."""
    official = load_preset("official").train
    assert (official.lr, official.betas, official.weight_decay) == (1e-4, (0.9, 0.95), 0.0)
    assert (official.lr_schedule, official.warmup_steps, official.grad_clip) == ("constant", 0, None)
    assert official.precision == "bf16-pure"
    assert [lr_at(step, official) for step in (0, 1, official.steps - 1, 10**6)] == [1e-4] * 4
    assert (official.batch_size, official.grad_accum) == (8, 4)
    assert official.mix == {"semantic": 3, "referring": 1, "reasoning": 1}
    assert (official.bce_weight, official.dice_weight, official.threshold) == (2.0, 4.0, 0.6)
    assert official.attn_target_resize == "nearest"


def test_the_fp32_master_variant_differs_only_in_precision_and_clipping_and_is_asked_for_by_name():
    official, variant = load_preset("official"), load_preset("official-fp32master")
    assert variant.model == official.model and (variant.main_layer, variant.late_layer) == (14, 30)
    differ = {key: value for key, value in variant.train.to_dict().items() if official.train.to_dict()[key] != value}
    assert differ == {"precision": "bf16", "grad_clip": 1.0}
    assert variant.made_for is None and official.made_for is not None
    assert preset_for_mllm("llava-1.5", 4096) == "official"
    assert "official-fp32master" in official.description and "float32 master" in variant.description


def test_paper_preset_keeps_the_papers_schedule():
    paper = load_preset("paper").train
    assert (paper.lr, paper.lr_schedule, paper.warmup_steps, paper.grad_clip, paper.precision) == (
        5e-5, "linear", 100, 1.0, "bf16")


# ----------------------------------------------------------------------------- clipping and precision in the loop


def _record_steps(monkeypatch, scales: list[float]) -> list[dict]:
    """Scale step i's loss by ``scales[i]``; record the parameters and raw gradients as the optimizer gets them."""
    real_losses, real_norm = trainer_module.compute_losses, trainer_module.gradient_norm
    calls = {"n": 0}
    seen: list[dict] = []

    def scaled_losses(*args, **kwargs):
        losses = real_losses(*args, **kwargs)
        losses["loss"] = losses["loss"] * scales[calls["n"]]
        calls["n"] += 1
        return losses

    def recording_norm(params, grad_clip):
        seen.append({"params": [p.detach().clone() for p in params],
                     "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
                     "param_dtypes": {p.dtype for p in params}, "grad_clip": grad_clip})
        return real_norm(params, grad_clip)

    monkeypatch.setattr(trainer_module, "compute_losses", scaled_losses)
    monkeypatch.setattr(trainer_module, "gradient_norm", recording_norm)
    return seen


def _trainable_names(run: Path) -> list[str]:
    """The trainable parameters' names in the model's order (the order the loop hands them to gradient_norm)."""
    from lens_train.training.loading import build_model

    config = read_run_config(run)
    return [name for name, p in build_model(config.model, config.sam, seed=0).named_parameters() if p.requires_grad]


def _adamw_by_hand(seen: list[dict], config: TrainConfig) -> list[torch.Tensor]:
    """An independent torch.optim.AdamW fed the recorded raw gradients, unclipped."""
    params = [torch.nn.Parameter(p.clone()) for p in seen[0]["params"]]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    for step in seen:
        for p, g in zip(params, step["grads"]):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("grad_clip", [None, 0.0])
def test_without_clipping_a_huge_gradient_moves_the_weights_as_plain_adamw(store, tmp_path, monkeypatch, grad_clip):
    """Step 1 with a normal gradient, step 2 with one 10^6 times larger: unclipped, AdamW's second update weighs
    the two as they are (clipped to norm 1, the second would count ~10^6 times less)."""
    seen = _record_steps(monkeypatch, [1.0, 1e6])
    run = tmp_path / "run"
    _train(store, run, steps=2, grad_clip=grad_clip, precision="fp32")
    config = read_run_config(run).train
    assert len(seen) == 2 and seen[1]["grad_clip"] == grad_clip
    norms = [json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert norms[1] > 1e4 * norms[0] > 0  # the huge gradient was there, and its norm is logged unclipped

    expected = _adamw_by_hand(seen, config)
    weights = load_file(str(run / "model.safetensors"))
    names = _trainable_names(run)
    assert sorted(names) == sorted(weights) and len(names) == len(expected)
    for name, value in zip(names, expected):
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-8, msg=name)


def test_with_clipping_the_same_run_differs_from_plain_adamw(store, tmp_path, monkeypatch):
    """The check above can tell: clipping at 1.0 moves the weights elsewhere."""
    seen = _record_steps(monkeypatch, [1.0, 1e6])
    run = tmp_path / "run"
    _train(store, run, steps=2, grad_clip=1.0, precision="fp32")
    expected = _adamw_by_hand(seen, read_run_config(run).train)
    weights = load_file(str(run / "model.safetensors"))
    largest = max((weights[name] - value).abs().max().item() for name, value in zip(_trainable_names(run), expected))
    assert largest > 1e-5


def _contiguous_grid_sample(monkeypatch) -> None:
    """torch 2.14.1's CPU grid_sample returns garbage (NaN, 1e38) for a non-contiguous bfloat16 input, which
    lens_core.keypoints.sample_grid passes it (F_i^2 as a transposed view); until sample_grid makes its input
    contiguous, this test does (it checks dtypes, not that kernel)."""
    real = torch.nn.functional.grid_sample
    monkeypatch.setattr(torch.nn.functional, "grid_sample",
                        lambda values, grid, *args, **kwargs: real(values.contiguous(), grid, *args, **kwargs))


def test_bf16_pure_trains_weights_and_optimizer_state_in_bfloat16(store, tmp_path, monkeypatch):
    _contiguous_grid_sample(monkeypatch)
    seen = _record_steps(monkeypatch, [1.0, 1.0])
    run = tmp_path / "pure"
    _train(store, run, steps=2, precision="bf16-pure", grad_clip=None)
    assert [step["param_dtypes"] for step in seen] == [{torch.bfloat16}] * 2
    assert all(g is None or g.dtype == torch.bfloat16 for step in seen for g in step["grads"])
    assert {t.dtype for t in load_file(str(run / "model.safetensors")).values()} == {torch.bfloat16}
    state = torch.load(run / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert state and {t.dtype for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")} == {
        torch.bfloat16}
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == "bf16-pure" and config["train"]["precision"] == "bf16-pure"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)
    moved = [after.ne(before).any().item() for before, after in zip(seen[0]["params"], seen[1]["params"])]
    assert any(moved)  # the bf16 weights did move, though not all: an update of lr (3e-4) is below bfloat16's
    assert not all(moved)  # spacing at 1.0 (2^-8), so the norm weights that start at 1 cannot (the authors' too)

    from lens_train.training.loading import load_run

    loaded = load_run(run)  # evaluation rebuilds the model and loads the bfloat16 weights into it
    assert loaded.precision == "bf16-pure"


def test_bf16_keeps_float32_master_weights_and_state(store, tmp_path, monkeypatch):
    seen = _record_steps(monkeypatch, [1.0])
    run = tmp_path / "bf16"
    _train(store, run, steps=1, precision="bf16")
    assert seen[0]["param_dtypes"] == {torch.float32}
    assert {t.dtype for t in load_file(str(run / "model.safetensors")).values()} == {torch.float32}
    state = torch.load(run / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    assert json.loads((run / "config.json").read_text())["precision"] == "fp32"  # bf16 autocast is CUDA's only


# ----------------------------------------------------------------------------- L_attn's target and upsampling


@pytest.mark.parametrize(("coords", "resize"), [("cell_center", "area"), ("align_corners", "nearest")])
def test_attention_loss_gets_the_runs_target_resize_and_the_models_corners(monkeypatch, coords, resize):
    """compute_losses hands lens_core's attention_loss the heatmap upsampling that matches the model's keypoint
    coordinates (align_corners=True for coords "align_corners", the authors') and the preset's target resize."""
    from types import SimpleNamespace

    from lens_core import Lens
    from lens_core.config import LensConfig
    from lens_core.losses import attention_loss

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return attention_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "attention_loss", recording)
    model_config = LensConfig.from_dict({**load_preset("tiny").model.to_dict(), "coords": coords})
    model = SimpleNamespace(config=model_config, masks_at_original_size=Lens.masks_at_original_size)
    generator = torch.Generator().manual_seed(0)
    gts = [(torch.rand(40, 60, generator=generator) > 0.5).to(torch.uint8), torch.ones(50, 30, dtype=torch.uint8)]
    batch = SimpleNamespace(gts=gts, original_sizes=torch.tensor([[40, 60], [50, 30]]),
                            input_sizes=torch.tensor([[683, 1024], [1024, 614]]))
    out = SimpleNamespace(low_res_logits=torch.randn(2, 256, 256, generator=generator),
                          heatmap=torch.rand(2, 24, 24, generator=generator))
    losses = trainer_module.compute_losses(model, out, batch, _tiny(attn_target_resize=resize))
    assert calls == [{"size": 128, "align_corners": coords == "align_corners", "target_resize": resize}]
    expected = attention_loss(out.heatmap, gts, [(683, 1024), (1024, 614)], size=128,
                              align_corners=coords == "align_corners", target_resize=resize)
    assert torch.equal(losses["attn"], expected)


def test_bf16_pure_resumes_bit_for_bit(store, tmp_path, monkeypatch):
    """The bfloat16 weights and AdamW state go into the checkpoint as they are, so a killed bf16-pure run
    resumed ends where an uninterrupted one does."""
    _contiguous_grid_sample(monkeypatch)
    pure = {"precision": "bf16-pure", "grad_clip": None, "steps": 3, "ckpt_every": 1}
    _train(store, tmp_path / "full", **pure)
    real = trainer_module.compute_losses
    calls = {"n": 0}

    def killed_in_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_losses", killed_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        _train(store, tmp_path / "cut", **pure)
    monkeypatch.setattr(trainer_module, "compute_losses", real)
    train(TrainRequest(caches=(store,), out=tmp_path / "cut", device="cpu", quiet=True, resume=True))
    rows = {name: (tmp_path / name / "metrics.jsonl").read_text() for name in ("full", "cut")}
    losses = {name: [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, text.splitlines())]
              for name, text in rows.items()}
    assert losses["cut"] == losses["full"] and len(losses["full"]) == 3
    full, cut = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "cut"))
    assert all(full[k].dtype == torch.bfloat16 and torch.equal(full[k], cut[k]) for k in full)
