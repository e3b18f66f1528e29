"""``lens-chat``: the LENS agent (:class:`~lens_train.inference.agent.LensAgent`) on stdin.

Each line is an instruction (dialogue, segmentation or a follow-up, routed by the frozen MLLM: the
supplement's Algorithm S1) or a command (``/image PATH``, ``/forget``, ``/help``, ``/quit``).

Usage::

    lens-chat --checkpoint toy --image scene.png -o chat-out/
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import typer

from ..cli import command_app, user_errors
from .options import CheckpointOption, DeviceOption, DtypeOption, MaxNewTokensOption, MllmOption, SamOption, ThresholdOption
from ..errors import UserError
from .agent import LensAgent
from .segmenter import load_image

app = command_app(help="Chat with a frozen MLLM that can segment (LENS, Algorithm S1).")

HELP_TEXT = (
    "Type an instruction, or a command: /image PATH (set the image), /forget (clear the memory), "
    "/help, /quit. Segmentation requests get an overlay; follow-ups ask about the last one."
)


def run_repl(agent: LensAgent, lines: Iterable[str], say: Callable[[str], None],
             prompt: Callable[[], None] | None = None) -> None:
    """Serve ``lines`` (stdin) until ``/quit`` or the end; mistakes in one line do not end the chat.

    Each reply is printed as ``lens [KIND]: TEXT`` plus ``(figure: PATH)`` when one was saved.
    """
    if prompt:
        prompt()
    for raw in lines:
        line = raw.strip()
        try:
            if not line:
                pass
            elif line in ("/quit", "/exit"):
                return
            elif line == "/help":
                say(HELP_TEXT)
            elif line == "/forget":
                agent.forget()
                say("memory cleared")
            elif line.startswith("/image"):
                path = line[len("/image"):].strip()
                if not path:
                    raise UserError("usage: /image PATH")
                image = agent.set_image(path)
                say(f"image {path} ({image.width}x{image.height})")
            elif line.startswith("/"):
                raise UserError(f"unknown command {line.split()[0]}: {HELP_TEXT}")
            else:
                reply = agent.step(line)
                say(f"lens [{reply.kind}]: {reply.text}" + (f" (figure: {reply.figure_path})" if reply.figure_path else ""))
        except (UserError, ValueError, FileNotFoundError) as error:
            say(f"error: {' '.join(str(error).split())}")
        if prompt:
            prompt()


@app.command()
def chat(
    checkpoint: CheckpointOption,
    mllm: MllmOption = None,
    sam: SamOption = None,
    image: Annotated[Path | None, typer.Option(help="Image to start with (change it with /image PATH).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays and side-by-side pictures.")] = Path("lens-chat-out"),
    max_new_tokens: MaxNewTokensOption = 128,
    threshold: ThresholdOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Chat on stdin: dialogue, segmentation and follow-ups, routed by the frozen MLLM (Algorithm S1).

    Default backbone: the run's own (the MLLM and SAM its training cache was built with, as
    recorded in its config.json); --mllm / --sam name them when they moved.
    """
    with user_errors():
        if image is not None:
            load_image(image)  # a bad path fails before any model is loaded
        agent = LensAgent.from_run(checkpoint, mllm=mllm, sam=sam, device=device, dtype=dtype, threshold=threshold,
                                   figure_dir=out, max_new_tokens=max_new_tokens)
        if image is not None:
            agent.set_image(image)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(HELP_TEXT)
    run_repl(agent, sys.stdin, typer.echo, prompt=(lambda: typer.echo("> ", nl=False)) if interactive else None)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
