"""Loading a trained LENS model: one way, for evaluation, live inference, the agent, export and conversion.

:func:`build_model` builds LENS from a run's model config on the SAM its cache was built with (the
trainer builds its model the same way, before training it); :func:`load_run` opens any ``--checkpoint``
(a run folder, a model folder, ``toy`` or a Hub id, through :func:`~.model_folder.open_trained`, which
reads its config once), builds the model and loads the trained weights. Nothing here imports the
training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lens_core import Lens, LensConfig, build_lens

from .run_config import RunConfig

if TYPE_CHECKING:
    from .model_folder import Trained


def build_model(model_config: LensConfig, sam_spec: str, *, seed: int) -> Lens:
    """LENS on the SAM the store was cached with; the seed fixes the trainable init."""
    from lens_cache.backbones.sam import build_sam  # segment_anything: loaded only when a model is built

    sam = build_sam(sam_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_lens(model_config, sam)


@dataclass
class LoadedRun:
    """A trained model rebuilt from its run folder."""

    model: Lens
    config: RunConfig
    step: int
    threshold: float
    precision: str


def load_run(run_dir: "str | Path | Trained", *, device: torch.device | str = "cpu", sam: str | None = None) -> LoadedRun:
    """Rebuild the model of a checkpoint from its config and load its trained weights (eval mode).

    Args:
        run_dir: a run folder, a model folder, ``toy`` or a Hub id (:func:`~..training.model_folder.open_trained`,
            the one loader of every ``--checkpoint``), or what ``open_trained`` returned.
        sam: override of the recorded SAM spec (a real SAM checkpoint that moved).
    """
    from .model_folder import Trained, open_trained

    trained = run_dir if isinstance(run_dir, Trained) else open_trained(run_dir)
    config = trained.config
    model = build_model(config.model, sam or config.sam, seed=config.train.seed)
    step = trained.load_into(model)
    return LoadedRun(model=model.to(device).eval(), config=config, step=step,
                     threshold=config.train.threshold, precision=config.train.precision)
