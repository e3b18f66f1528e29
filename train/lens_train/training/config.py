"""Training configuration: a typed dataclass filled from a preset file, carried by every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lens_core.config import from_known_keys

from ..errors import UsageError

PRECISIONS = ("bf16", "bf16-pure", "fp32")
LR_SCHEDULES = ("linear", "cosine", "constant")
ATTN_TARGET_RESIZES = ("area", "nearest")
#: fields added after run format 1 was first written, with the value every older run trained with
ADDED_SINCE_FORMAT_1 = {"lr_schedule": "linear", "attn_target_resize": "area", "train_questions": "random"}
TRAIN_QUESTIONS = ("random", "evaluation")


@dataclass(frozen=True)
class TrainConfig:
    """How stage 2 trains (not what the model is: that is ``lens_core.LensConfig``).

    Attributes:
        lr, betas, weight_decay: AdamW.
        batch_size: samples per optimizer micro-step; grad_accum micro-steps per update.
        steps: optimizer updates.
        warmup_steps: linear warm-up from lr / warmup_steps to lr over the first updates (0 = none).
        grad_clip: max global gradient norm; None (JSON null) or 0 = no clipping (the norm is still logged).
        dice_weight, bce_weight: L_seg = dice_weight * Dice + bce_weight * BCE.
        attn_weight: weight of L_attn (0 = Table 2 "w/o L_attn").
        attn_size: resolution of the heatmap/mask comparison in L_attn.
        mix: sampling ratio per task (semantic, referring, reasoning) across the caches.
        precision: "bf16": bf16 autocast on CUDA with float32 weights and optimizer state (float32 on the
            CPU); "bf16-pure": the whole model, its inputs and AdamW's state in bfloat16, no autocast and
            no float32 master weights, on every device (the authors' code); "fp32": float32 throughout.
        lr_schedule: after the warm-up, "linear" decay to 0 at ``steps``, "cosine" decay to 0 at
            ``steps``, or "constant" lr (the authors' code: a cosine whose period no run reaches).
        train_questions: which cached question of a query a training sample reads: "random" draws one of its
            training templates per sample with the run's seed (the authors' data pipeline; a store of one
            question per query has only the evaluation one), "evaluation" always reads the evaluation question.
        attn_target_resize: how L_attn brings the mask on SAM's padded 1024 frame to ``attn_size``:
            "area" averaging or "nearest" sampling (the authors' code), then > 0.5.
        warm_start: initialise the head from the MLLM's layers (needs the store's warm-start file).
        threshold: evaluation threshold on sigmoid(logit).
        seed: one seed fixes sampling, init and dropout.
    """

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    batch_size: int
    grad_accum: int
    steps: int
    warmup_steps: int
    grad_clip: float | None
    dice_weight: float
    bce_weight: float
    attn_weight: float
    attn_size: int
    mix: dict[str, float] = field(default_factory=dict)
    precision: Literal["bf16", "bf16-pure", "fp32"] = "bf16"
    warm_start: bool = False
    threshold: float = 0.5
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 100
    # Added after run format 1 was first written: the defaults are what older run configs meant.
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    attn_target_resize: Literal["area", "nearest"] = "area"
    train_questions: Literal["random", "evaluation"] = "random"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {self.lr_schedule!r}")
        if self.train_questions not in TRAIN_QUESTIONS:
            raise UsageError(f"train_questions must be one of {', '.join(map(repr, TRAIN_QUESTIONS))}, "
                             f"got {self.train_questions!r}")
        if self.attn_target_resize not in ATTN_TARGET_RESIZES:
            raise UsageError(f"attn_target_resize must be one of {', '.join(map(repr, ATTN_TARGET_RESIZES))}, "
                             f"got {self.attn_target_resize!r}")
        if self.grad_clip is not None and (isinstance(self.grad_clip, bool) or not self.grad_clip >= 0):
            raise UsageError(f"grad_clip must be a norm >= 0, or null for no clipping, got {self.grad_clip!r}")
        if self.warmup_steps < 0:
            raise UsageError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.steps < 1:
            raise UsageError("batch_size, grad_accum and steps must be >= 1")
        unknown = set(self.mix) - {"semantic", "referring", "reasoning"}
        if unknown:
            raise UsageError(f"unknown task(s) in mix: {sorted(unknown)}; tasks are semantic, referring, reasoning")

    @property
    def clips(self) -> bool:
        """Whether the gradient norm is clipped (grad_clip is a positive number)."""
        return self.grad_clip is not None and self.grad_clip > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_record(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields of :data:`ADDED_SINCE_FORMAT_1` that hold the value older runs
        trained with: what a run's ``config.json`` holds, so a run of today's defaults writes what format 1
        always wrote (and an older lens-seg still reads it)."""
        return {key: value for key, value in self.to_dict().items()
                if not (key in ADDED_SINCE_FORMAT_1 and value == ADDED_SINCE_FORMAT_1[key])}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return from_known_keys(cls, values, error=UsageError)
