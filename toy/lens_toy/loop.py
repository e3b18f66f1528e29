"""One resumable training loop for every toy pretraining stage.

A stage is a model, the parameters it trains and a ``step_fn(step) -> dict of floats``
that computes the loss of optimizer step ``step`` (its batch is a pure function of
``step``: scenes are drawn by index, so no data-loader state needs saving). The loop
owns AdamW, the schedule (linear warm-up, constant, linear decay over the last
``decay_frac`` of the steps: a constant phase keeps the lr up through the late
break-outs from-scratch models show), gradient clipping, a progress line (steps/s,
ETA) and a checkpoint every ``ckpt_every`` steps (model, optimizer, step; written beside
and renamed, loaded with ``weights_only=True``). Rerunning the same command after a kill
resumes from the last checkpoint and gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from lens_cache.progress import format_duration
from lens_core.files import replaced_on_success, torch_save


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup: int = 50
    decay_frac: float = 0.2
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        decay_start = int(self.steps * (1 - self.decay_frac))
        if step < decay_start:
            return self.lr
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - decay_start))


def run_stage(
    name: str,
    model: torch.nn.Module,
    params: Iterable[torch.nn.Parameter] | list[dict],
    step_fn: Callable[[int], dict[str, torch.Tensor]],
    schedule: Schedule,
    work: Path,
    *,
    ckpt_every: int = 100,
    log_every: int = 20,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train ``params`` of ``model`` for ``schedule.steps`` steps; resume from ``work/NAME.ckpt``.

    ``params`` is an iterable of parameters or a list of groups ``{"params": [...], "lr_scale": s}``
    (a group's lr is the schedule's times ``s``).

    ``step_fn`` returns named scalars; ``"loss"`` is minimised. Returns the logged history
    (also appended to ``work/NAME.log.jsonl``).
    """
    work.mkdir(parents=True, exist_ok=True)
    groups = [{"params": [p for p in group["params"] if p.requires_grad], "lr_scale": group.get("lr_scale", 1.0)}
              for group in (params if isinstance(params, list) and params and isinstance(params[0], dict)
                            else [{"params": list(params)}])]
    params = [p for group in groups for p in group["params"]]
    scales = [group.pop("lr_scale") for group in groups]  # by index: a loaded optimizer state drops extra keys
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, betas=(0.9, 0.98), weight_decay=schedule.weight_decay)
    ckpt, history_path = work / f"{name}.ckpt", work / f"{name}.log.jsonl"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log(f"[{name}] resumed at step {start}/{schedule.steps} from {ckpt}")
    history: list[dict] = []
    model.train()
    t0, sums, count = time.monotonic(), {}, 0
    for step in range(start, schedule.steps):
        for group, scale in zip(optimizer.param_groups, scales, strict=True):
            group["lr"] = schedule.lr_at(step) * scale
        values = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        values["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
        optimizer.step()
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        count += 1
        done = step + 1
        if done % log_every == 0 or done == schedule.steps:
            rate = (done - start) / max(1e-9, time.monotonic() - t0)
            row = {"step": done, "lr": schedule.lr_at(step), **{k: v / count for k, v in sums.items()}}
            history.append(row)
            with open(history_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            shown = " ".join(f"{k} {v / count:.4f}" for k, v in sums.items())
            log(f"[{name}] step {done}/{schedule.steps} {shown} | {rate:.2f} steps/s, "
                f"ETA {format_duration((schedule.steps - done) / max(rate, 1e-9))}")
            sums, count = {}, 0
        if done % ckpt_every == 0 or done == schedule.steps:
            with replaced_on_success(ckpt) as tmp:
                torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done}, tmp)
    model.eval()
    return history


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()

