"""The options every command that runs a trained head declares (``lens-segment``, ``lens-chat``, ``lens-serve``).

Each is written once here, with its help; a command adds only its own. The defaults say where a value
comes from when the option is left out: the head's own record (its ``config.json``: the MLLM and SAM
its training cache was built with, the threshold it was trained for).
"""

from __future__ import annotations

from typing import Annotated

import typer

CheckpointOption = Annotated[str, typer.Option(
    help="Run folder (lens-train), model folder (lens-export-model), 'toy' (the shipped toy head) or a Hub model id.")]
MllmOption = Annotated[str | None, typer.Option(
    help="MLLM checkpoint folder / HF name or 'tiny' (default: the one the head's cache was built with).")]
SamOption = Annotated[str | None, typer.Option(help="SAM as vit_h:PATH or 'tiny' (default: the head's).")]
ThresholdOption = Annotated[float | None, typer.Option(
    help="Mask = sigmoid(logit) > threshold (default: the head's).")]
DeviceOption = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")]
DtypeOption = Annotated[str | None, typer.Option(
    help="Backbone compute dtype (default: the one the head's cache was built with).")]
MaxNewTokensOption = Annotated[int, typer.Option(help="Longest answer, in tokens.")]
