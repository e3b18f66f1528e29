"""``lens-convert``: checkpoints of other LENS code as run folders (``lens-convert authors CKPT --out RUN``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import command_app, user_errors

app = command_app(name="lens-convert", help="Convert LENS checkpoints written by other code into run folders.",
                  no_args_is_help=True)


@app.callback()
def main() -> None:
    """One subcommand per source of checkpoints (today: ``authors``)."""


@app.command()
def authors(
    checkpoint: Annotated[Path, typer.Argument(help="full_N.pth written by the authors' train.py (trainable tensors).")],
    out: Annotated[Path, typer.Option(help="Run folder to write (lens-eval / lens-segment --checkpoint).")],
    mllm: Annotated[str, typer.Option(help="The MLLM the checkpoint was trained on (llava-hf folder or HF-cache name; tiny/toy for tests): its identity is recorded.")],
    sam: Annotated[str, typer.Option(help="Its SAM: vit_h:PATH (vit_l:, vit_b:), or tiny/toy.")],
    preset: Annotated[str, typer.Option(help="Preset whose model the weights fill (the authors' structure): official or a .json.")] = "official",
    layer: Annotated[int | None, typer.Option(help="MLLM layer the head reads [the preset's main layer: 14].")] = None,
    device: Annotated[str | None, typer.Option(help="Device to load the MLLM on to record its identity [cuda if present].")] = None,
    dtype: Annotated[str | None, typer.Option(help="MLLM compute dtype (part of the identity) [bf16 on GPU, fp32 on CPU].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """The authors' checkpoint (GitHub jiazhen-code/LENS) as a run folder; the key mapping is strict."""
    from .convert import convert_authors_checkpoint

    with user_errors(out):
        convert_authors_checkpoint(checkpoint, out=out, preset=preset, mllm=mllm, sam=sam, layer=layer,
                                   device=device, dtype=dtype, overwrite=overwrite, say=lambda s: typer.echo(s, err=True))
