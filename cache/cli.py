"""Console script `lens-cache` (stage 1). Not built yet: issue 3."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, help="Build LENS feature caches (stage 1).")


@app.command()
def build() -> None:
    """Not built yet."""
    typer.echo("lens-cache is not built yet (stage 1, issue 3).", err=True)
    sys.exit(2)


if __name__ == "__main__":
    app()
