"""Console scripts `lens-train` and `lens-eval` (stage 2). Not built yet: issue 4."""

from __future__ import annotations

import sys

import typer

train_app = typer.Typer(add_completion=False, help="Train LENS from feature caches (stage 2).")
eval_app = typer.Typer(add_completion=False, help="Evaluate a LENS run on a feature cache (gIoU / cIoU).")


@train_app.command()
def train() -> None:
    """Not built yet."""
    typer.echo("lens-train is not built yet (stage 2, issue 4); `make demo` trains the core on synthetic tensors.", err=True)
    sys.exit(2)


@eval_app.command()
def evaluate() -> None:
    """Not built yet."""
    typer.echo("lens-eval is not built yet (stage 2, issue 4).", err=True)
    sys.exit(2)
