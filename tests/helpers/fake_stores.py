"""The fake stores lens-train's tests train on, and the requests and command lines they run.

Built with :func:`lens_train.testing.build_store` (the fake extractor: ``fake-mllm``, d=64, layer 14,
tiny SAM), from two synthetic images; ``tests/conftest.py`` builds them once per session (fixture
``fake_stores``) for ``test_train_trainer.py`` (what a run does) and ``test_train_refusals.py`` (what
lens-train refuses, in one line).
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from lens_train.cli import train_app
from lens_train.training.trainer import TrainRequest

#: Training overrides that keep a step short: one sample, two micro-batches, no workers, every step logged.
FAST = {"batch_size": 1, "grad_accum": 2, "num_workers": 0, "log_every": 1, "warmup_steps": 2}


def build_fake_stores(tmp_path_factory) -> dict[str, str]:
    """Store URLs by role: ``train`` (synthetic:train), ``reason`` (synthetic-reason:val, the same backbone),
    ``other`` (another MLLM's), ``incomplete`` (marked as an unfinished build)."""
    from lens_cache.store import ATTRS_KEY, open_group
    from lens_manifests import build_manifest

    from lens_train.testing import build_store, small_synthetic

    root = small_synthetic(tmp_path_factory.mktemp("synthetic"), images=2)
    out = tmp_path_factory.mktemp("stores")
    manifest = build_manifest("synthetic:train", root)
    train_store = build_store(manifest, out / "train", spec="synthetic:train")
    reason = build_store(build_manifest("synthetic-reason:val", root), out / "reason", spec="synthetic-reason:val")
    other = build_store(build_manifest("synthetic-reason:val", root), out / "other", spec="synthetic-reason:val",
                        mllm="another-mllm")
    incomplete = build_store(build_manifest("synthetic-reason:val", root), out / "incomplete", spec="synthetic-reason:val")
    group = open_group(incomplete.location, mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["complete"] = False
    group.attrs.put({ATTRS_KEY: attrs})
    return {"train": train_store.url, "reason": reason.url, "other": other.url, "incomplete": incomplete.url}


def train_request(stores: dict[str, str], out: Path, **train_overrides) -> TrainRequest:
    """A quiet CPU run of preset ``tiny`` on the ``train`` and ``reason`` stores, with :data:`FAST` and
    ``train_overrides``."""
    return TrainRequest(caches=(stores["train"], stores["reason"]), out=out, preset="tiny",
                        train_overrides={**FAST, **train_overrides}, device="cpu", quiet=True)


def cli_error(args: list[str]) -> str:
    """The one line ``lens-train ARGS --device cpu --quiet`` prints on stderr, asserting it exits with 2."""
    result = CliRunner().invoke(train_app, [*args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
