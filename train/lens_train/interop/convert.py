"""An authors' ``full_N.pth`` as a run folder that ``lens-eval`` and ``lens-segment`` accept.

The run folder is what ``lens-train`` writes, minus the optimizer (there is nothing to resume): its
``config.json`` names the preset, the layer and the SAM, and records the identity of the live
backbone given with ``--mllm`` (its features are what the weights will read, so that backbone is
checked against every store and live model later, as for a trained run); ``model.safetensors``
holds the converted tensors; ``checkpoint.json`` comes last. The folder appears whole or not at all.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lens_cache.errors import UsageError
from lens_core.files import folder_replaced_on_success, write_text_atomically

from .authors import convert_state_dict, epoch_of, read_checkpoint


def convert_authors_checkpoint(
    checkpoint: str | Path,
    *,
    out: str | Path,
    preset: str = "official",
    mllm: str,
    sam: str,
    layer: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    say=print,
) -> Path:
    """Convert ``checkpoint`` into the run folder ``out``; returns ``out``.

    Args:
        preset: the preset whose model the weights fill (``official``, or a .json with its structure).
        mllm, sam: the backbone the checkpoint was trained on (``build_extractor`` specs): its identity is
            recorded, so stores and live models of another backbone are refused later.
        layer: the MLLM layer the head reads [the preset's main layer].
    Raises:
        UsageError: an unreadable checkpoint, a key mapping that is not one-to-one, shapes of another
            backbone, or an ``out`` that exists (without ``overwrite``).
    """
    from safetensors.torch import save_file

    from lens_cache.backbones import build_extractor
    from lens_cache.identity import identity_hash
    from lens_cache.version import lens_version

    from ..training.checkpoint import MARKER_FILE, MODEL_FILE, WEIGHTS_FORMAT, trainable_state_dict
    from ..training.presets import load_preset
    from ..training.run_config import RunConfig, StoreRecord, write_run_config
    from ..training.loading import build_model

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    theirs = read_checkpoint(checkpoint)
    chosen = load_preset(preset)
    layer = chosen.main_layer if layer is None else int(layer)
    model = build_model(chosen.model, sam, seed=0)
    converted = convert_state_dict(theirs, model)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in converted.items():
            params[name].copy_(tensor.to(params[name].dtype))
    say(f"mapped {len(converted)} tensors of {checkpoint} onto a {chosen.name} LENS")

    extractor = build_extractor(mllm=mllm, sam=sam, layers=(layer,), device=device, dtype=dtype)
    identity = dict(extractor.identity)
    hashed = identity_hash(identity)
    step = epoch_of(checkpoint) or 0
    config = RunConfig(
        preset=chosen.name, preset_description=chosen.description, model=chosen.model, train=chosen.train,
        layer=layer, sam=sam, identity_hash=hashed,
        stores=(StoreRecord(url="", identity_hash=hashed, manifest_hash="", spec=None, layers=(layer,), num_queries=0,
                            num_valid_queries=0, identity=identity),),
        device="cpu", precision=chosen.train.precision, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        cli={"convert": "authors", "checkpoint": str(checkpoint), "mllm": mllm},
        versions={"torch": torch.__version__, "lens": lens_version() or "not installed"},
        warm_start={"requested": False, "used": False, "converted_from": str(checkpoint)},
    )
    with folder_replaced_on_success(out) as tmp:
        write_run_config(tmp, config)
        save_file(trainable_state_dict(model), str(tmp / MODEL_FILE),
                  metadata={"step": str(step), "format": WEIGHTS_FORMAT})
        marker = {"step": step, "files": [MODEL_FILE], "time": config.created, "converted_from": str(checkpoint)}
        write_text_atomically(tmp / MARKER_FILE, json.dumps(marker, indent=2) + "\n")
    say(f"wrote {out} (step {step}: epoch {step} of the authors' run); evaluate it with lens-eval --checkpoint {out}")
    return out
