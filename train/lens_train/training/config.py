"""Training configuration: a typed dataclass filled from a preset file, carried by every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..errors import UsageError


@dataclass(frozen=True)
class TrainConfig:
    """How stage 2 trains (not what the model is: that is ``lens_core.LensConfig``).

    Attributes:
        lr, betas, weight_decay: AdamW.
        batch_size: samples per optimizer micro-step; grad_accum micro-steps per update.
        steps: optimizer updates; warmup_steps of linear warm-up, then linear decay to 0.
        grad_clip: max global gradient norm (0 = off).
        dice_weight, bce_weight: L_seg = dice_weight * Dice + bce_weight * BCE.
        attn_weight: weight of L_attn (0 = Table 2 "w/o L_attn").
        attn_size: resolution of the heatmap/mask comparison in L_attn.
        mix: sampling ratio per task (semantic, referring, reasoning) across the caches.
        precision: "bf16" autocast on GPU, or "fp32".
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
    grad_clip: float
    dice_weight: float
    bce_weight: float
    attn_weight: float
    attn_size: int
    mix: dict[str, float] = field(default_factory=dict)
    precision: Literal["bf16", "fp32"] = "bf16"
    warm_start: bool = False
    threshold: float = 0.5
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    ckpt_every: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.precision not in ("bf16", "fp32"):
            raise UsageError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.steps < 1:
            raise UsageError("batch_size, grad_accum and steps must be >= 1")
        unknown = set(self.mix) - {"semantic", "referring", "reasoning"}
        if unknown:
            raise UsageError(f"unknown task(s) in mix: {sorted(unknown)}; tasks are semantic, referring, reasoning")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)
