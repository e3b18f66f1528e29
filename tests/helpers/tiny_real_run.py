"""Test helper (not shipped): a tiny but REAL end-to-end run (real tiny LLaVA + tiny SAM, real
cache, real training).

Unlike :mod:`lens_train.testing` (a fake extractor), everything here uses the backbones
built in code with the real classes (``build_extractor(mllm="tiny", sam="tiny")``), so
live inference (``lens-segment``, ``lens-chat``) can be checked against the cached path,
and the frozen guarantee can be checked on a real MLLM. It takes ~15 s on 2 CPU cores;
``tests/conftest.py`` builds it once per session (fixture ``tiny_real_run``).

The MLLM's checksum (:func:`lens_train.evaluation.frozen.mllm_checksum`) and its greedy answers to
:data:`PROBE_PROMPTS` are recorded before anything else touches it, and the checksum again
after the cache build, so tests can compare them with later states. (Training reads the
store, never the MLLM: ``tests/test_frozen.py`` trains LENS beside the live MLLM instead.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from lens_cache.backbones import build_extractor
from lens_cache.backbones.runtime import cpu_threads
from lens_cache.build import build_cache
from lens_cache.images import read_rgb
from lens_manifests import build_manifest
from lens_train.evaluation.frozen import mllm_checksum
from lens_train.testing import small_synthetic
from lens_train.training.trainer import TrainRequest, train

#: The synthetic split cached and trained on: 2 images with one query each (fast).
TINY_REAL_SPEC = "synthetic-reason:val"
TINY_REAL_LAYER = 14
#: (use the first image?, prompt) pairs whose greedy answers are recorded before LENS exists.
#: Few and short: a prefill over 576 image tokens and 32 layers costs ~1 s on 2 CPU cores.
PROBE_PROMPTS: tuple[tuple[bool, str], ...] = (
    (False, "hello, who are you?"),
    (True, "what is in this image?"),
)
PROBE_MAX_NEW_TOKENS = 4
TINY_REAL_TRAIN = {"steps": 2, "batch_size": 1, "grad_accum": 1, "num_workers": 0, "log_every": 1,
                   "warmup_steps": 1, "ckpt_every": 2}


@dataclass
class TinyRealRun:
    """A trained run on a cache built with the real tiny backbones.

    Attributes:
        root: the synthetic dataset folder.
        manifest: the manifest that was cached (one row per query).
        store_url: the feature store; run_dir: the lens-train run folder.
        extractor: the LensFeatureExtractor that built the store (tiny LLaVA + tiny SAM, CPU).
        checksums: ``initial`` / ``after_cache`` -> mllm_checksum.
        probe_answers: greedy answers to :data:`PROBE_PROMPTS` before the cache build.
    """

    root: Path
    manifest: pa.Table
    store_url: str
    run_dir: Path
    extractor: Any
    checksums: dict[str, str] = field(default_factory=dict)
    probe_answers: list[str] = field(default_factory=list)

    def image_path(self, row: int = 0) -> str:
        """Image file of manifest row ``row``."""
        return self.manifest.column("image_path")[row].as_py()

    def query(self, row: int = 0) -> tuple[str, bool]:
        """(text, is_sentence) of manifest row ``row``."""
        return self.manifest.column("text")[row].as_py(), bool(self.manifest.column("is_sentence")[row].as_py())


def probe_answers(mllm: Any, image_path: str) -> list[str]:
    """Greedy answers of the MLLM adapter to :data:`PROBE_PROMPTS` (the image of ``image_path`` where asked)."""
    image = read_rgb(image_path)
    return [mllm.generate(image if with_image else None, prompt, max_new_tokens=PROBE_MAX_NEW_TOKENS)
            for with_image, prompt in PROBE_PROMPTS]


def build_tiny_real_run(workdir: str | Path) -> TinyRealRun:
    """Synthetic data -> cache with the real tiny backbones -> 2 training steps on CPU, under ``workdir``."""
    # One thread: the width-64 tiny models are far too small to split across busy cores.
    with cpu_threads(1, torch.device("cpu")):
        return _build_tiny_real_run(Path(workdir))


def _build_tiny_real_run(workdir: Path) -> TinyRealRun:
    root = small_synthetic(workdir / "synthetic", images=2)
    manifest = build_manifest(TINY_REAL_SPEC, root)
    extractor = build_extractor(mllm="tiny", sam="tiny", layers=(TINY_REAL_LAYER,), device="cpu")
    model = extractor.mllm.model
    first_image = manifest.column("image_path")[0].as_py()
    run = TinyRealRun(root=root, manifest=manifest, store_url="", run_dir=workdir / "run", extractor=extractor)
    run.checksums["initial"] = mllm_checksum(model)
    run.probe_answers = probe_answers(extractor.mllm, first_image)

    # batch_size=1: one image per extract call, as live inference does, so the float32
    # features (and thus the stored float16 ones) are computed by the very same kernels.
    store = build_cache(manifest, workdir / "store", lambda: extractor, spec=TINY_REAL_SPEC, batch_size=1,
                        progress=False)
    run.store_url = store.url
    run.checksums["after_cache"] = mllm_checksum(model)

    train(TrainRequest(caches=(store.url,), out=run.run_dir, preset="tiny", train_overrides=dict(TINY_REAL_TRAIN),
                       layer=TINY_REAL_LAYER, device="cpu", quiet=True))
    return run
