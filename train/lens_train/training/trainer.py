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
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lens_cache.backbones.runtime import cpu_threads, resolve_device
from lens_cache.version import lens_version
from lens_cache.locks import exclusive, reading

from lens_core import Lens, LensConfig, LensOutput, build_lens
from lens_manifests.files import write_text_atomically
from lens_core.losses import attention_loss, segmentation_loss

from .checkpoint import checkpoint_step, load_checkpoint, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import Batch, MixedBatchSampler, QueryDataset, concat_datasets, make_loader
from ..errors import NonFiniteLossError, UserError
from ..figures import write_curve
from .presets import Preset, load_preset
from .run_config import RunConfig, StoreRecord, read_run_config, write_run_config
from .stores import (default_preset, open_stores, read_warm_start, refuse_output_in_a_store, require_prefix,
                     resolve_sam_spec)

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "curve.png"


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


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when the preset asks for bf16 compute; fp32 (no autocast) on the CPU.

    For "bf16-pure" this is what evaluation uses (its model is rebuilt in float32 and the bfloat16
    weights loaded into it); training a "bf16-pure" model runs without autocast (:func:`train_autocast`).
    """
    if device.type == "cuda" and precision in ("bf16", "bf16-pure"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The training forward's context: :func:`autocast_for`, but none for "bf16-pure" (the model itself is bf16)."""
    return contextlib.nullcontext() if precision == "bf16-pure" else autocast_for(device, precision)


def effective_precision(device: torch.device, precision: str) -> str:
    """How a run of ``precision`` trains on ``device``: "bf16" (autocast) only on CUDA, "bf16-pure" everywhere."""
    if precision == "bf16-pure":
        return precision
    return "bf16" if device.type == "cuda" and precision == "bf16" else "fp32"


def parameter_dtype(precision: str) -> torch.dtype:
    """dtype of the model, its inputs and AdamW's state while training: bfloat16 for "bf16-pure", else float32."""
    return torch.bfloat16 if precision == "bf16-pure" else torch.float32


def cast_for_training(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model in its training dtype (:func:`parameter_dtype`), in place.

    Under "bf16-pure" every parameter and buffer becomes bfloat16 (the authors cast the whole model),
    except the frozen random-Fourier matrix of SAM's positional encoding
    (``positional_encoding_gaussian_matrix``): segment_anything multiplies it with float32 coordinates,
    so it stays float32 and the positions it encodes are rounded to bfloat16 afterwards, not before.
    """
    dtype = parameter_dtype(precision)
    model.to(dtype)
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(getattr(module, "positional_encoding_gaussian_matrix", None), torch.Tensor):
                module.float()
    return model


def gradient_norm(params: Sequence[torch.Tensor], grad_clip: float | None) -> torch.Tensor:
    """The global gradient norm of ``params``, clipping the gradients to ``grad_clip`` when it is > 0
    (None or 0: the gradients are left untouched)."""
    if grad_clip is not None and grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


# ----------------------------------------------------------------------------- run folder


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


def _metrics_rows(run_dir: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:  # torn by a crash or a full disk while it was appended
        pass
    return [r for r in rows if up_to is None or r["step"] <= up_to]


def _rewrite_metrics(run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Keep only rows up to the checkpoint (a crash after it may have logged more steps)."""
    write_text_atomically(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# ----------------------------------------------------------------------------- setup


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


def build_model(model_config: LensConfig, sam_spec: str, *, seed: int) -> Lens:
    """LENS on the SAM the store was cached with; the seed fixes the trainable init."""
    from lens_cache.backbones.sam import build_sam  # segment_anything: loaded only when a model is built

    sam = build_sam(sam_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_lens(model_config, sam)


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
    say = log or ((lambda line: None) if request.quiet else (lambda line: print(line, flush=True)))
    setup = prepare(request, say)
    cfg, train_cfg, device = setup.model_config, setup.train_config, setup.device
    run_dir = setup.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    dtype = parameter_dtype(train_cfg.precision)
    model = cast_for_training(build_model(cfg, setup.sam_spec, seed=train_cfg.seed).to(device), train_cfg.precision)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay)
    generator = torch.Generator().manual_seed(train_cfg.seed)  # the S1.4 global-only dropout
    if setup.start_step > 0:
        checkpoint = load_checkpoint(run_dir, model)
        optimizer.load_state_dict(checkpoint.optimizer)
        set_rng_state(checkpoint.rng, generator)
        rows = _metrics_rows(run_dir, up_to=setup.start_step)
        _rewrite_metrics(run_dir, rows)
        say(f"resuming {run_dir} at step {setup.start_step}/{train_cfg.steps}")
    else:
        setup.config = dataclasses.replace(setup.config, warm_start=apply_warm_start(model, setup, say))
        write_run_config(run_dir, setup.config)
        rows = []
        (run_dir / METRICS_FILE).unlink(missing_ok=True)

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
        n_params = sum(p.numel() for p in params)
        say(f"training {n_params / 1e6:.2f}M parameters on {len(dataset)} queries ({mix}) from "
            f"{len(setup.stores)} store(s); preset {setup.preset.name}, {effective_precision(device, train_cfg.precision)} "
            f"on {device}, {train_cfg.steps} steps x {train_cfg.batch_size} x {train_cfg.grad_accum}"
            + ("; each sample asks one of its cached training questions, drawn with the seed" if draw_questions else ""))
    loader = make_loader(dataset, sampler, num_workers=train_cfg.num_workers, device=device, seed=train_cfg.seed)
    batches = iter(loader)

    started = time.perf_counter()
    interval_start, interval_steps = started, 0
    final_loss = float("nan")
    metrics_file = open(run_dir / METRICS_FILE, "a")
    failed = True
    try:
        for step in range(setup.start_step, train_cfg.steps):
            step_start = time.perf_counter()
            model.train()
            lr = lr_at(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals = torch.zeros(5, device=device)
            for _ in range(train_cfg.grad_accum):
                batch = next(batches).to(device, features_dtype=dtype)
                with train_autocast(device, train_cfg.precision):
                    out = model(batch.image_states, batch.text_states, batch.text_lengths, batch.sam_embeddings,
                                prefix_states=batch.prefix_states, generator=generator)
                losses = compute_losses(model, out, batch, train_cfg)
                (losses["loss"] / train_cfg.grad_accum).backward()
                totals += torch.stack([losses[k].detach().float() for k in ("loss", "seg", "dice", "bce", "attn")])
            grad_norm = gradient_norm(params, train_cfg.grad_clip)
            # One host sync per step: the logged values, and the finiteness check before the update.
            values = torch.cat([totals / train_cfg.grad_accum, grad_norm.detach().float().reshape(1)]).tolist()
            loss, seg, dice, bce, attn, gnorm = values
            if not all(math.isfinite(v) for v in (loss, gnorm)):
                kept = checkpoint_step(run_dir)
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                value = loss if not math.isfinite(loss) else gnorm
                raise NonFiniteLossError(
                    f"{what} is {value} at step {step + 1}: stopped before the update; the last good checkpoint "
                    + (f"(step {kept}) is kept in {run_dir}" if kept is not None else f"does not exist yet in {run_dir}")
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            final_loss = loss

            now = time.perf_counter()
            samples = train_cfg.batch_size * train_cfg.grad_accum
            row = {"step": step + 1, "loss": loss, "seg": seg, "dice": dice, "bce": bce, "attn": attn, "lr": lr,
                   "grad_norm": gnorm, "samples_per_s": samples / max(now - step_start, 1e-9),
                   "elapsed_s": now - started}
            rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            interval_steps += 1
            done = step + 1
            if done % train_cfg.log_every == 0 or done == train_cfg.steps or done == setup.start_step + 1:
                rate = interval_steps / max(now - interval_start, 1e-9)
                say(f"step {done}/{train_cfg.steps} | loss {loss:.4f} (seg {seg:.4f}: dice {dice:.4f} bce {bce:.4f};"
                    f" attn {attn:.4f}) | lr {lr:.2e} | grad {gnorm:.3f} | {rate:.2f} steps/s, "
                    f"{rate * samples:.1f} samples/s | ETA {_format_seconds((train_cfg.steps - done) / max(rate, 1e-9))}")
                interval_start, interval_steps = now, 0
            if done % train_cfg.ckpt_every == 0 or done == train_cfg.steps:
                save_checkpoint(run_dir, model=model, optimizer=optimizer, step=done, generator=generator,
                                extra={"loss": loss})
        failed = False
    finally:
        metrics_file.close()
        _write_curve(run_dir, rows, warn=not failed)  # a failed run's own error is the one line to show
    seconds = time.perf_counter() - started
    from .model_folder import MODEL_DIR, export_model  # huggingface_hub: loaded once a run has finished

    export_model(run_dir, run_dir / MODEL_DIR, overwrite=True)  # RUN/model: what using the head needs
    say(f"done: {run_dir} ({train_cfg.steps} steps, {_format_seconds(seconds)}); evaluate with "
        f"lens-eval --checkpoint {run_dir} --cache VAL_STORE")
    return TrainResult(run_dir=run_dir, steps=train_cfg.steps, final_loss=final_loss, seconds=seconds,
                       resumed_from=setup.start_step)


def _write_curve(run_dir: Path, rows: Sequence[dict[str, Any]], *, warn: bool = True) -> None:
    """Write the training curve; a failure is a warning (``warn``), never the run's outcome."""
    try:
        write_curve(run_dir / CURVE_FILE, rows)
    except Exception as error:  # a figure must never hide the run's real outcome
        if warn:
            print(f"warning: could not write {CURVE_FILE}: {error}", file=sys.stderr)
