"""Console scripts of stage 2: ``lens-train`` (train from feature stores) and ``lens-eval``.

Heavy imports happen inside the commands, so ``--help`` answers at once. A mistake in
what was asked (a store of another backbone, a layer the store lacks, a preset of the
wrong size, a damaged store, a run folder another run is writing, ...: a
``lens_cache.errors.UserError`` or ``lens_manifests.ManifestError``) prints one line on
stderr and exits 2, and so does an output whose disk is full or read-only (the writers
remove their temporary files first); a NaN/inf loss exits 1 after saying which checkpoint
was kept. Any other exception is a bug and keeps its traceback. ``LENS_DEBUG=1`` shows
tracebacks always.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from lens_cache import cli as stage_one  # user_errors: one definition for every command
from lens_cache.cli import USER_ERROR_EXIT, command_app

from .errors import NonFiniteLossError, UserError

train_app = command_app(help="Train LENS from feature caches (stage 2).")
eval_app = command_app(help="Evaluate a LENS run on a feature cache (gIoU / cIoU).")
export_app = command_app(help="Write a run's model folder (Hugging Face layout: config.json, model.safetensors, README.md).")

__all__ = ["TRAINING_FAILED_EXIT", "USER_ERROR_EXIT", "command_app", "eval_app", "export_app", "train_app",
           "user_errors"]

#: exit status of a run stopped by a NaN/inf loss (a user error: ``USER_ERROR_EXIT``, 2)
TRAINING_FAILED_EXIT = 1


def user_errors(
    output: str | Path | None = None, *, also: tuple[type[BaseException], ...] = ()
) -> contextlib.AbstractContextManager[None]:
    """Stage 1's :func:`lens_cache.cli.user_errors` plus stage 2's own failure: one line on stderr,
    exit 2 (user mistake, full or read-only disk under ``output``) or 1 (training diverged)."""
    return stage_one.user_errors(output, exit_codes={NonFiniteLossError: TRAINING_FAILED_EXIT}, also=also)


def parse_settings(settings: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set NAME=VALUE`` items -> (LensConfig overrides, TrainConfig overrides).

    VALUE is read as JSON (``true``, ``0.9``, ``null``, ``[0.9, 0.95]``), else kept as the bare word.

    Raises:
        UserError: an item without ``=``, or a NAME that is no field of either config (one line, listing them).
    """
    import dataclasses
    import json

    from lens_core.config import LensConfig

    from .training.config import TrainConfig

    model_fields = {f.name for f in dataclasses.fields(LensConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for item in settings:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UserError(f"--set takes NAME=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if name in model_fields:
            model[name] = value
        elif name in train_fields:
            train[name] = value
        else:
            raise UserError(f"--set {name}: no such setting; model: {', '.join(sorted(model_fields))}; "
                            f"training: {', '.join(sorted(train_fields))}")
    return model, train


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@train_app.command()
def train(
    cache: Annotated[list[str], typer.Option("--cache", help="Feature store (repeat for several; same backbone).")],
    mix: Annotated[str | None, typer.Option(help="Task ratio semantic:referring:reasoning, e.g. 9:3:1 [preset's].")] = None,
    preset: Annotated[str | None, typer.Option(help="paper, official, toy, tiny, qwen2vl-2b, ... or a preset .json [the one made for the store's MLLM: toy, official, ...; the run's on --resume].")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder [runs/<preset>-<time>].")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps [preset's].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per micro-batch [preset's].")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step [preset's].")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate [preset's].")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps [preset's].")] = None,
    layer: Annotated[int | None, typer.Option(help="Cached MLLM layer to read [preset's main layer].")] = None,
    keypoint_description: Annotated[bool | None, typer.Option(
        "--keypoint-description/--no-keypoint-description", help="Table 2 ablation: keypoint descriptions on/off.")] = None,
    global_description: Annotated[bool | None, typer.Option(
        "--global-description/--no-global-description", help="Table 2 ablation: global description on/off.")] = None,
    attn_loss: Annotated[bool | None, typer.Option(
        "--attn-loss/--no-attn-loss", help="Table 2 ablation: --no-attn-loss sets the L_attn weight to 0.")] = None,
    heatmap_from: Annotated[str | None, typer.Option(help="Heatmap from the start-of-answer token (last) or all text tokens (mean).")] = None,
    detach_peak: Annotated[bool | None, typer.Option(
        "--detach-peak/--no-detach-peak", help="Divide the heatmap by its detached peak (official) or let the gradient through it [preset's].")] = None,
    seed: Annotated[int | None, typer.Option(help="Fixes init, sample order and dropout [0].")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [cuda when available].")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes [preset's].")] = None,
    log_every: Annotated[int | None, typer.Option(help="Progress line every N steps [preset's].")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (and at the end) [preset's].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the checkpoint in --out exactly.")] = False,
    warm_start: Annotated[bool | None, typer.Option(
        "--warm-start/--no-warm-start", help="Initialise the head from the MLLM's decoder layers k, k+1 (k = --layer) if the store has them [preset's].")] = None,
    sam: Annotated[str | None, typer.Option(help="vit_h:PATH (or toy:PATH) of the SAM a real-SAM store was cached with (tiny, shipped toy: not needed).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="NAME=VALUE of any model (LensConfig) or training (TrainConfig) field, repeatable; VALUE is JSON (true, 0.9, null, \"official\") or a bare word, e.g. --set descriptor=paper --set grad_clip=null (FIDELITY.md names the switches).")] = None,
) -> None:
    """Train the head, keypoint descriptor and SAM's mask decoder from cached features.

    Default preset: the one made for the store's MLLM (toy backbones: toy; LLaVA-1.5-7B:
    official, the authors' code's settings; Qwen2-VL-2B: qwen2vl-2b; ...), or the run's own
    with --resume. The paper's stated settings are --preset paper.
    """
    with user_errors(output=out):
        # torch comes with these: imported here so that `lens-train --help` answers at once
        from .training.data import parse_mix
        from .training.trainer import TrainRequest
        from .training.trainer import train as run_training

        if heatmap_from is not None and heatmap_from not in ("last", "mean"):
            raise UserError(f"--heatmap-from takes last or mean, got {heatmap_from!r}")
        if out is None:
            if resume:
                raise UserError("--resume needs --out RUN_DIR (the run to continue)")
            from .training.stores import default_preset

            preset = preset or default_preset(cache)  # resolved once: it names the run folder too
            out = Path("runs") / f"{Path(preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        model_overrides = _given(heatmap_from=heatmap_from, detach_peak=detach_peak,
                                 use_keypoint_description=keypoint_description,
                                 use_global_description=global_description)
        set_model, set_train = parse_settings(set_ or [])
        train_overrides = _given(
            steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
            mix=parse_mix(mix) if mix is not None else None, seed=seed, num_workers=workers, log_every=log_every,
            ckpt_every=ckpt_every, warm_start=warm_start,
            attn_weight=(0.0 if attn_loss is False else None),
        )
        request = TrainRequest(
            caches=tuple(cache), out=out, preset=preset, model_overrides={**set_model, **model_overrides},
            train_overrides={**set_train, **train_overrides}, layer=layer, device=device, resume=resume, sam=sam, quiet=quiet,
            cli={"argv": sys.argv[1:]},
        )
        run_training(request)


@eval_app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Run folder written by lens-train, model folder (lens-export-model) or 'toy'.")],
    cache: Annotated[str, typer.Option(help="Feature store to evaluate on (the run's backbone).")],
    threshold: Annotated[float | None, typer.Option(help="Mask = sigmoid(logit) > threshold [preset's].")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder [RUN_DIR/eval-<store>; a model folder: ./eval-<folder>/eval-<store>].")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N queries.")] = None,
    figures: Annotated[int, typer.Option(help="Rows of overlays.png (0 = none).")] = 8,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [cuda when available].")] = None,
    batch_size: Annotated[int, typer.Option(help="Queries per forward pass.")] = 4,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    sam: Annotated[str | None, typer.Option(help="SAM checkpoint if it moved since training (vit_h:PATH).")] = None,
) -> None:
    """gIoU / cIoU (overall, short and long queries), per-query IoU and overlay figures.

    Preset and backbone: the run's own (its config.json); the store must be of that backbone.
    """
    with user_errors(output=out):
        # torch comes with it: imported here so that `lens-eval --help` answers at once
        from .evaluation.evaluate import evaluate as run_evaluation

        run_evaluation(checkpoint, cache, threshold=threshold, out=out, limit=limit, figures=figures,
                       device=device, batch_size=batch_size, num_workers=workers, sam=sam)


@export_app.command()
def export_model(
    run: Annotated[Path, typer.Argument(help="Run folder written by lens-train (with a checkpoint).")],
    out: Annotated[Path, typer.Option(help="Model folder to write (refused if it exists and is not empty).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
) -> None:
    """Write RUN's model folder: config.json (model, preset, threshold, backbone identity), model.safetensors
    (the trainable tensors) and README.md (model card with the lens-eval results found in RUN).

    The folder appears whole or not at all. Use it with lens-segment / lens-eval --checkpoint OUT, or
    Segmenter.from_pretrained(OUT); huggingface_hub's push_to_hub uploads it as it is.
    """
    with user_errors(output=out):
        from .training.model_folder import export_model as run_export

        run_export(run, out, overwrite=overwrite, say=typer.echo)
