"""Stage 2: train LENS's head, keypoint descriptor and SAM's mask decoder from feature stores.

:func:`train` does everything ``lens-train`` does: open and check the stores, rebuild
the SAM that belongs to the cached embeddings, build the model from a preset, and run
AdamW (warm-up, then a linear, cosine or constant lr; gradient accumulation; optional
clipping; bf16 autocast on CUDA or a pure-bfloat16 model, as the preset says) on
``L = L_seg + attn_weight * L_attn``. The run folder holds::

    config.json        preset, LensConfig, TrainConfig, stores (identity, paths), CLI args (lens_train.training.run_config)
    metrics.jsonl      one row per optimizer step: loss parts, lr, grad norm, samples/s
    model.safetensors  trainable weights   } the checkpoint, every ckpt_every steps and at the end,
    optimizer.pt       optimizer + RNG     } written atomically (see lens_train.training.checkpoint)
    checkpoint.json    step (written last) }
    curve.png          the training curve
    model/             at the end of a finished run: the model folder (lens_train.training.model_folder)

One seed fixes everything: model init, the sample sequence (a function of the step,
see :class:`~lens_train.training.data.MixedBatchSampler`) and the global-only dropout's
generator (saved in the checkpoint). ``resume=True`` therefore continues exactly: on
the same device the losses of a resumed run equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lens_cache.backbones.runtime import cpu_threads, resolve_device
from lens_cache.version import lens_version
from lens_cache.locks import exclusive, reading

from lens_core import Lens, LensConfig, LensOutput, build_lens
from lens_core.losses import attention_loss, segmentation_loss

from .loading import build_model
from .checkpoint import checkpoint_step, load_checkpoint, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import Batch, MixedBatchSampler, QueryDataset, concat_datasets, make_loader
from ..errors import NonFiniteLossError, UserError
from .metrics_log import METRICS_FILE, format_seconds, metrics_rows, progress_line, rewrite_metrics, write_curve_quietly
from .precision import cast_for_training, effective_precision, parameter_dtype, train_autocast
from .presets import Preset, load_preset
from .run_config import RunConfig, StoreRecord, read_run_config, write_run_config
from .stores import (default_preset, open_stores, read_warm_start, refuse_output_in_a_store, require_prefix,
                     resolve_sam_spec)


@dataclass(frozen=True)
class TrainRequest:
    """What ``lens-train`` was asked to do.

    Attributes:
        caches: store paths/URLs, all of one backbone identity.
        out: run folder.
        preset: preset name or JSON path; None = the preset made for the first store's MLLM (``toy``,
            ``official``, ...; :func:`lens_train.training.presets.preset_for_mllm`), or the run's own on resume.
        model_overrides, train_overrides: LensConfig / TrainConfig fields set on the command
            line (only those given: on resume they must match the run's).
        layer: cached MLLM layer to read [the preset's main layer: 14, or 3 for ``toy``].
        device: ``cpu`` / ``cuda`` / None (CUDA when available).
        resume: continue the checkpoint in ``out`` (start fresh if it holds none).
        sam: ``vit_h:PATH`` of the SAM a real-SAM store was cached with (tiny needs none).
        cli: the command line as given, recorded in config.json.
        quiet: no progress lines.
    """

    caches: tuple[str, ...]
    out: Path
    preset: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None
    device: str | None = None
    resume: bool = False
    sam: str | None = None
    cli: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False


@dataclass
class TrainResult:
    """Where a finished run is and how it ended."""

    run_dir: Path
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``warmup_steps`` of linear warm-up, then
    ``train.lr_schedule``: "linear" or "cosine" decay to 0 at ``train.steps``, or "constant" ``train.lr``."""
    warmup = min(train.warmup_steps, train.steps)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    if train.lr_schedule == "constant":
        return train.lr
    if train.lr_schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, train.steps - warmup))
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.lr * max(0.0, (train.steps - step) / max(1, train.steps - warmup))


def compute_losses(model: Lens, out: LensOutput, batch: Batch, train: TrainConfig) -> dict[str, torch.Tensor]:
    """``{"loss", "seg", "dice", "bce", "attn"}`` of one micro-batch, in float32.

    Masks go back to each image's original size (SAM's post-processing) before L_seg,
    as LISA computes it; L_attn compares the heatmap with the mask on the padded frame, the heatmap
    upsampled as the model's ``coords`` places cells (``align_corners`` or not) and the mask brought to
    ``attn_size`` by ``train.attn_target_resize``.
    """
    logits = model.masks_at_original_size(out.low_res_logits.float(), batch.input_sizes, batch.original_sizes)
    seg = segmentation_loss(logits, batch.gts, dice_weight=train.dice_weight, bce_weight=train.bce_weight)
    if train.attn_weight > 0:
        input_sizes = [tuple(int(v) for v in size) for size in batch.input_sizes.tolist()]
        attn = attention_loss(out.heatmap.float(), batch.gts, input_sizes, size=train.attn_size,
                              align_corners=model.config.coords == "align_corners",
                              target_resize=train.attn_target_resize)
    else:
        attn = torch.zeros((), device=seg["seg"].device)
    return {"loss": seg["seg"] + train.attn_weight * attn, "seg": seg["seg"], "dice": seg["dice"],
            "bce": seg["bce"], "attn": attn}


def forward_backward(model: Lens, batch: Batch, train: TrainConfig, context: contextlib.AbstractContextManager, *,
                     generator: torch.Generator | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One micro-batch's forward (under ``context``: :func:`train_autocast`), losses (:func:`compute_losses`)
    and backward of ``scale * loss`` (``1 / grad_accum``); returns the losses."""
    with context:
        out = model(batch.image_states, batch.text_states, batch.text_lengths, batch.sam_embeddings,
                    prefix_states=batch.prefix_states, generator=generator)
    losses = compute_losses(model, out, batch, train)
    (losses["loss"] * scale).backward()
    return losses


def gradient_norm(params: Sequence[torch.Tensor], grad_clip: float | None) -> torch.Tensor:
    """The global gradient norm of ``params``, clipping the gradients to ``grad_clip`` when it is > 0
    (None or 0: the gradients are left untouched)."""
    if grad_clip is not None and grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


# ----------------------------------------------------------------------------- setup


def _check_overrides(kind: str, recorded: dict[str, Any], overrides: dict[str, Any], run_dir: Path) -> None:
    differ = []
    for key, value in overrides.items():
        old = recorded.get(key)
        new = list(value) if isinstance(value, tuple) else value
        old = list(old) if isinstance(old, tuple) else old
        if old != new:
            differ.append(f"{key} {old!r} -> {new!r}")
    if differ:
        raise UserError(
            f"--resume continues {run_dir} as it was started; these {kind} settings differ: {'; '.join(differ)} "
            "(drop them, or train into another --out)"
        )


@dataclass
class RunSetup:
    """Everything the loop needs, resolved and checked."""

    run_dir: Path
    preset: Preset
    model_config: LensConfig
    train_config: TrainConfig
    stores: list
    sam_spec: str
    device: torch.device
    start_step: int
    config: RunConfig


def prepare(request: TrainRequest, log: Callable[[str], None]) -> RunSetup:
    """Resolve the preset (or the run's config on resume), open and check the stores."""
    run_dir = Path(request.out)
    device = resolve_device(request.device)
    existing_step = checkpoint_step(run_dir)
    resuming = request.resume and existing_step is not None
    if not request.resume and (existing_step is not None or (run_dir / METRICS_FILE).is_file()):
        raise UserError(
            f"{run_dir} already holds a run (step {existing_step}): pass --resume to continue it, or choose another --out"
        )
    if request.resume and existing_step is None:
        log(f"--resume: {run_dir} holds no checkpoint yet, starting from step 0")

    if resuming:
        recorded = read_run_config(run_dir)
        if request.preset is not None and request.preset != recorded.preset:
            raise UserError(f"--resume: {run_dir} was trained with preset {recorded.preset!r}, not {request.preset!r}")
        _check_overrides("model", recorded.model.to_dict(), request.model_overrides, run_dir)
        _check_overrides("training", recorded.train.to_dict(), request.train_overrides, run_dir)
        model_config, train_config = recorded.model, recorded.train
        preset = Preset(recorded.preset, recorded.preset_description, model_config, train_config)
        if request.layer is not None and request.layer != recorded.layer:
            raise UserError(f"--resume: {run_dir} was trained on layer {recorded.layer}, not --layer {request.layer}")
        layer = recorded.layer
    else:
        try:
            preset = load_preset(request.preset or default_preset(request.caches), model_overrides=request.model_overrides,
                                 train_overrides=request.train_overrides)
        except ValueError as error:  # an unknown preset, a preset file or override that does not validate
            raise UserError(str(error)) from None
        model_config, train_config = preset.model, preset.train
        layer = request.layer if request.layer is not None else preset.main_layer

    stores = open_stores(request.caches, layer=layer, hidden_size=model_config.hidden_size,
                         prompt_dim=model_config.prompt_dim, preset_name=preset.name, grid_size=model_config.grid_size)
    for store in stores:
        require_prefix(store, layer=layer, config=model_config)
    if resuming:
        trained = [(s.identity_hash, s.manifest_hash) for s in recorded.stores]
        given = [(s.identity_hash, s.manifest_hash) for s in stores]
        if trained != given:
            raise UserError(
                f"--resume needs the stores {run_dir} was trained on, in the same order: "
                + ", ".join(s.url for s in recorded.stores)
            )
    sam_spec = resolve_sam_spec(stores[0].identity, request.sam or (recorded.sam if resuming else None))

    config = recorded if resuming else RunConfig(
        preset=preset.name,
        preset_description=preset.description,
        model=model_config,
        train=train_config,
        layer=layer,
        sam=sam_spec,
        identity_hash=stores[0].identity_hash,
        stores=tuple(StoreRecord.of(s) for s in stores),
        cli=request.cli,
        device=str(device),
        precision=effective_precision(device, train_config.precision),
        versions={"torch": torch.__version__, "lens": lens_version() or "not installed"},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return RunSetup(run_dir=run_dir, preset=preset, model_config=model_config, train_config=train_config,
                    stores=stores, sam_spec=sam_spec, device=device, start_step=existing_step if resuming else 0,
                    config=config)


def apply_warm_start(model: Lens, setup: RunSetup, log: Callable[[str], None]) -> dict[str, Any]:
    """Load the MLLM's decoder layers k, k+1 (k = the run's layer) into the head when asked and
    available; say what happened (a store without them is a note, not an error).

    Raises:
        UserError: the store's layers do not fit the head, or are not the file it recorded.
    """
    if not setup.train_config.warm_start:
        return {"requested": False, "used": False}
    store = setup.stores[0]
    warm = read_warm_start(store, layer=setup.config.layer, config=setup.model_config)
    if isinstance(warm, str):
        note = f"warm start unavailable: {warm}; the head starts from random init"
        log(note)
        return {"requested": True, "used": False, "note": note}
    model.head.load_decoder_layers(warm.state_dicts)
    first, second = warm.layers
    differs = f"; the preset differs from the MLLM in {', '.join(warm.notes)}" if warm.notes else ""
    log(f"warm start: head layers 0-1 loaded from the MLLM's decoder layers {first} and {second} "
        f"(sha256 {store.warm_start['sha256'][:12]}, store {store.url}){differs}")
    return {"requested": True, "used": True, "layers": [first, second], "sha256": store.warm_start["sha256"]}


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Live:
    """What a run holds in memory while it trains."""

    model: Lens
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the S1.4 global-only dropout's (saved in the checkpoint)


def train(request: TrainRequest, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) one training run; see the module docstring.

    On the CPU the loop runs with half the cores as torch threads (the data loader and
    the metrics writer need the rest; a full-width OpenMP team busy-waits against them).

    The run folder is locked for the whole run (``RUN_DIR.lock`` beside it, see
    :mod:`lens_cache.locks`): a second run on the same ``--out`` is refused, naming the first.

    Raises:
        StoreError / UserError: a store or option problem (one-line message); DamagedStoreError:
            a sample of a store is damaged; LockHeldError: another run is writing ``request.out``.
        NonFiniteLossError: the loss or gradient became NaN/inf; the last good checkpoint stays.
    """
    say = log or ((lambda line: None) if request.quiet else (lambda line: print(line, flush=True)))
    refuse_output_in_a_store(request.out)  # before the lock: nothing is created there
    with exclusive(request.out, command="lens-train", log=say), cpu_threads(None, resolve_device(request.device)), \
            contextlib.ExitStack() as reads:
        for cache in request.caches:  # a rebuild or repair of a store is refused while this run reads it
            reads.enter_context(reading(cache))
        return _train(request, log=log)


def _train(request: TrainRequest, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """:func:`train` inside its locks: set up, start or resume, run the steps, export the model folder."""
    say = log or ((lambda line: None) if request.quiet else (lambda line: print(line, flush=True)))
    setup = prepare(request, say)
    run_dir, steps = setup.run_dir, setup.train_config.steps
    run_dir.mkdir(parents=True, exist_ok=True)
    live, rows = _start(setup, say)
    batches = _batches(setup, live, say)
    started = time.perf_counter()
    final_loss = _run_steps(setup, live, batches, rows, say, started=started)
    seconds = time.perf_counter() - started
    from .model_folder import MODEL_DIR, export_model  # huggingface_hub: loaded once a run has finished

    export_model(run_dir, run_dir / MODEL_DIR, overwrite=True)  # RUN/model: what using the head needs
    say(f"done: {run_dir} ({steps} steps, {format_seconds(seconds)}); evaluate with "
        f"lens-eval --checkpoint {run_dir} --cache VAL_STORE")
    return TrainResult(run_dir=run_dir, steps=steps, final_loss=final_loss, seconds=seconds,
                       resumed_from=setup.start_step)


def _start(setup: RunSetup, say: Callable[[str], None]) -> tuple[_Live, list[dict[str, Any]]]:
    """The model, AdamW and the dropout's generator at the run's start step, and the metrics rows up to it.

    A fresh run loads the warm start (when asked), writes config.json and starts an empty metrics.jsonl;
    a resumed run loads the checkpoint and drops the rows logged after it.
    """
    train_cfg, run_dir = setup.train_config, setup.run_dir
    model = build_model(setup.model_config, setup.sam_spec, seed=train_cfg.seed).to(setup.device)
    model = cast_for_training(model, train_cfg.precision)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay)
    generator = torch.Generator().manual_seed(train_cfg.seed)  # the S1.4 global-only dropout
    if setup.start_step > 0:
        checkpoint = load_checkpoint(run_dir, model)
        optimizer.load_state_dict(checkpoint.optimizer)
        set_rng_state(checkpoint.rng, generator)
        rows = metrics_rows(run_dir, up_to=setup.start_step)
        rewrite_metrics(run_dir, rows)
        say(f"resuming {run_dir} at step {setup.start_step}/{train_cfg.steps}")
    else:
        setup.config = dataclasses.replace(setup.config, warm_start=apply_warm_start(model, setup, say))
        write_run_config(run_dir, setup.config)
        rows = []
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    return _Live(model=model, params=params, optimizer=optimizer, generator=generator), rows


def _batches(setup: RunSetup, live: _Live, say: Callable[[str], None]) -> Iterator[Batch]:
    """The run's micro-batches from its start step on: its stores' queries, mixed by task as the preset says
    (a function of the seed and the step). A fresh run first says what it trains on what."""
    train_cfg, device = setup.train_config, setup.device
    datasets = [QueryDataset(s.url, setup.config.layer, store_index=i) for i, s in enumerate(setup.stores)]
    dataset, tasks = concat_datasets(datasets)
    # The authors' data pipeline asks each training sample with a question template drawn at random: a store
    # that caches several (lens-cache --question-set authors) gives one per sample, drawn from (seed, step).
    draw_questions = train_cfg.train_questions == "random" and dataset.has_training_questions
    sampler = MixedBatchSampler(tasks, train_cfg.mix, batch_size=train_cfg.batch_size, grad_accum=train_cfg.grad_accum,
                                seed=train_cfg.seed, start_step=setup.start_step, end_step=train_cfg.steps,
                                draw_questions=draw_questions)
    if setup.start_step == 0:
        mix = ", ".join(f"{t} {p:.2f}" for t, p in sampler.probabilities.items())
        n_params = sum(p.numel() for p in live.params)
        say(f"training {n_params / 1e6:.2f}M parameters on {len(dataset)} queries ({mix}) from "
            f"{len(setup.stores)} store(s); preset {setup.preset.name}, {effective_precision(device, train_cfg.precision)} "
            f"on {device}, {train_cfg.steps} steps x {train_cfg.batch_size} x {train_cfg.grad_accum}"
            + ("; each sample asks one of its cached training questions, drawn with the seed" if draw_questions else ""))
    return iter(make_loader(dataset, sampler, num_workers=train_cfg.num_workers, device=device, seed=train_cfg.seed))


def _run_steps(setup: RunSetup, live: _Live, batches: Iterator[Batch], rows: list[dict[str, Any]],
               say: Callable[[str], None], *, started: float) -> float:
    """The steps from the start step to the last: each one's row appended to metrics.jsonl (and ``rows``), a
    progress line every ``log_every`` steps (and at the first and last), a checkpoint every ``ckpt_every``
    (and at the last). The curve is written however the loop ends. Returns the last step's loss."""
    train_cfg, run_dir = setup.train_config, setup.run_dir
    samples = train_cfg.batch_size * train_cfg.grad_accum
    interval_start, interval_steps = started, 0
    final_loss = float("nan")
    metrics_file = open(run_dir / METRICS_FILE, "a")
    failed = True
    try:
        for step in range(setup.start_step, train_cfg.steps):
            step_start = time.perf_counter()
            row = _step(step, live, batches, setup)
            final_loss = row["loss"]
            now = time.perf_counter()
            row.update(samples_per_s=samples / max(now - step_start, 1e-9), elapsed_s=now - started)
            rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            interval_steps += 1
            done = step + 1
            if done % train_cfg.log_every == 0 or done == train_cfg.steps or done == setup.start_step + 1:
                rate = interval_steps / max(now - interval_start, 1e-9)
                say(progress_line(row, steps=train_cfg.steps, rate=rate, samples=samples))
                interval_start, interval_steps = now, 0
            if done % train_cfg.ckpt_every == 0 or done == train_cfg.steps:
                save_checkpoint(run_dir, model=live.model, optimizer=live.optimizer, step=done,
                                generator=live.generator, extra={"loss": final_loss})
        failed = False
    finally:
        metrics_file.close()
        write_curve_quietly(run_dir, rows, warn=not failed)  # a failed run's own error is the one line to show
    return final_loss


def _step(step: int, live: _Live, batches: Iterator[Batch], setup: RunSetup) -> dict[str, Any]:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches' forward and backward, the gradient
    norm (clipped as the preset says), AdamW's update at :func:`lr_at`; returns the step's metrics row
    (without its timings).

    Raises:
        NonFiniteLossError: the loss or the gradient norm is NaN/inf; nothing was updated.
    """
    train_cfg, device = setup.train_config, setup.device
    live.model.train()
    lr = lr_at(step, train_cfg)
    for group in live.optimizer.param_groups:
        group["lr"] = lr
    totals = torch.zeros(5, device=device)
    for _ in range(train_cfg.grad_accum):
        batch = next(batches).to(device, features_dtype=parameter_dtype(train_cfg.precision))
        losses = forward_backward(live.model, batch, train_cfg, train_autocast(device, train_cfg.precision),
                                  generator=live.generator, scale=1 / train_cfg.grad_accum)
        totals += torch.stack([losses[k].detach().float() for k in ("loss", "seg", "dice", "bce", "attn")])
    grad_norm = gradient_norm(live.params, train_cfg.grad_clip)
    # One host sync per step: the logged values, and the finiteness check before the update.
    values = torch.cat([totals / train_cfg.grad_accum, grad_norm.detach().float().reshape(1)]).tolist()
    loss, seg, dice, bce, attn, gnorm = values
    if not all(math.isfinite(v) for v in (loss, gnorm)):
        kept = checkpoint_step(setup.run_dir)
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        value = loss if not math.isfinite(loss) else gnorm
        raise NonFiniteLossError(
            f"{what} is {value} at step {step + 1}: stopped before the update; the last good checkpoint "
            + (f"(step {kept}) is kept in {setup.run_dir}" if kept is not None
               else f"does not exist yet in {setup.run_dir}")
        )
    live.optimizer.step()
    live.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": loss, "seg": seg, "dice": dice, "bce": bce, "attn": attn, "lr": lr,
            "grad_norm": gnorm}
