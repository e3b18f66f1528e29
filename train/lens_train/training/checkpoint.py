"""Checkpoints of a run: trainable weights, optimizer and RNG state, and a marker, written atomically.

A checkpoint in ``RUN_DIR`` is three files:

* ``model.safetensors``: the trainable parameters only (head, descriptor, SAM's mask
  decoder, the [CLS] position); the frozen SAM prompt encoder is rebuilt from the store's
  SAM spec. In the dtype they train in (float32; bfloat16 for precision "bf16-pure"), so a
  resumed run continues bit for bit.
* ``optimizer.pt``: ``torch.save`` of AdamW's state, the step and every RNG state, as
  tensors and plain types only, so that ``torch.load(weights_only=True)`` reads it
  (a file from disk is data, never code).
* ``checkpoint.json``: step, files, time; written last: a checkpoint exists once it does.

Each file is written to ``NAME.tmp`` and renamed over the old one; a write that fails
(a full disk, a read-only folder) removes the ``.tmp`` files and raises the ``OSError``
itself (torch would say ``unexpected pos``), which the CLI prints as one line. All three
carry the step; :func:`load_checkpoint` refuses a set whose steps disagree (a crash
between renames).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lens_core.files import removed_on_failure, torch_save, write_text_atomically

from ..errors import UserError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
MARKER_FILE = "checkpoint.json"
WEIGHTS_FORMAT = "lens-trainable-v1"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> CPU contiguous copy of every parameter with ``requires_grad``."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def damaged_file(path: Path, error: Exception) -> UserError:
    """The one-line error for a checkpoint file that does not load: truncated, or holding something else than
    what lens-train writes. torch's own message is left out on purpose: for a file it refuses to unpickle it
    advises ``weights_only=False``, which would run whatever code the file holds."""
    return UserError(f"{path} is damaged or was not written by lens-train ({type(error).__name__}; it is never "
                     "loaded unsafely): resume from an earlier copy of the run, or train again into a new --out")


def load_trainable(model: nn.Module, path: Path) -> int:
    """Load ``model.safetensors`` into the trainable parameters, strictly.

    Returns:
        the step recorded in the file's metadata.
    Raises:
        UserError: a trainable parameter is missing from the file, the file has a key the
            model lacks, or shapes differ (a checkpoint of another configuration).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: resume from a copy of the run, or train again into a new --out") from None
    except Exception as error:  # safetensors raises its own types for a truncated or foreign file
        raise damaged_file(path, error) from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise UserError(f"{path}: {name} is {tuple(tensors[name].shape)}, the model has {tuple(p.shape)}")
            p.copy_(tensors[name].to(p.device, p.dtype))
    return int(metadata.get("step", -1))


# ----------------------------------------------------------------------------- RNG state


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG of the process, as tensors and plain types (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "model_generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved (CUDA states only where a GPU is present)."""
    generator.set_state(state["model_generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


# ----------------------------------------------------------------------------- save / load


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds besides the weights (already loaded into the model)."""

    step: int
    optimizer: dict[str, Any]
    rng: dict[str, Any]


def save_checkpoint(
    run_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the three checkpoint files of ``step`` (completed optimizer updates), marker last."""
    run_dir = Path(run_dir)
    model_tmp = run_dir / (MODEL_FILE + ".tmp")
    optimizer_tmp = run_dir / (OPTIMIZER_FILE + ".tmp")
    with removed_on_failure(model_tmp, optimizer_tmp):
        save_file(trainable_state_dict(model), str(model_tmp), metadata={"step": str(step), "format": WEIGHTS_FORMAT})
        with open(model_tmp, "rb") as f:
            os.fsync(f.fileno())
        torch_save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(generator)}, optimizer_tmp)
        model_tmp.replace(run_dir / MODEL_FILE)
        optimizer_tmp.replace(run_dir / OPTIMIZER_FILE)
    marker = {"step": step, "files": [MODEL_FILE, OPTIMIZER_FILE], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **(extra or {})}
    write_text_atomically(run_dir / MARKER_FILE, json.dumps(marker, indent=2) + "\n")


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint in ``run_dir``, or None if it holds none."""
    marker = Path(run_dir) / MARKER_FILE
    if not marker.is_file():
        return None
    return int(json.loads(marker.read_text())["step"])


def load_checkpoint(run_dir: Path, model: nn.Module, *, with_optimizer: bool = True) -> Checkpoint:
    """Load the weights into ``model`` and return the optimizer/RNG state (``weights_only``).

    Raises:
        UserError: no checkpoint, or its files belong to different steps.
    """
    run_dir = Path(run_dir)
    step = checkpoint_step(run_dir)
    if step is None:
        raise UserError(f"{run_dir} holds no checkpoint ({MARKER_FILE} missing): train first with lens-train --out {run_dir}")
    weights_step = load_trainable(model, run_dir / MODEL_FILE)
    if weights_step != step:
        raise UserError(f"{run_dir}: {MODEL_FILE} is from step {weights_step} but {MARKER_FILE} says {step} "
                        "(interrupted while saving): delete the run or restore a copy")
    if not with_optimizer:
        return Checkpoint(step=step, optimizer={}, rng={})
    try:
        state = torch.load(run_dir / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{run_dir / OPTIMIZER_FILE} is missing: resume from a copy of the run, or train again "
                        "into a new --out") from None
    except Exception as error:  # a truncated file, or one holding more than tensors (never loaded unsafely)
        raise damaged_file(run_dir / OPTIMIZER_FILE, error) from None
    if int(state["step"]) != step:
        raise UserError(f"{run_dir}: {OPTIMIZER_FILE} is from step {state['step']} but {MARKER_FILE} says {step} "
                        "(interrupted while saving): delete the run or restore a copy")
    return Checkpoint(step=step, optimizer=state["optimizer"], rng=state["rng"])
