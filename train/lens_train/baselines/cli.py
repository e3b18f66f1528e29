"""``lens-lisa``: the LISA-style baseline of Table 1 (:mod:`.lisa`), trained on LENS's stores.

Commands::

    lens-lisa train --cache STORE --out RUN [--steps 600] [--batch 4] [--lr 3e-4] [--lora-rank 8] [--seed 0]
    lens-lisa eval --run RUN --cache STORE [--out DIR] [--limit N]
    lens-lisa export --run RUN --out FOLDER

``export`` writes the fine-tuned MLLM as a llava-hf folder, so ``lens-general general --mllm
FOLDER`` scores what the fine-tune did to its general abilities. Bad input is one line on stderr
and exit 2; heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..cli import command_app, user_errors

app = command_app(help="A LISA-style baseline (the MLLM fine-tuned with a [SEG] token) on LENS's feature stores.",
                  no_args_is_help=True)

ThreadsOption = Annotated[int | None, typer.Option(help="CPU threads [half the cores].")]


def _threads(threads: int | None):
    from lens_cache.backbones.runtime import cpu_threads, resolve_device  # torch: not for `--help`

    return cpu_threads(threads, resolve_device("cpu"))


@app.command()
def train(
    cache: Annotated[str, typer.Option(help="A stage-1 store (the training split LENS trains on).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (rerun the same command to resume).")],
    mllm: Annotated[str | None, typer.Option(help="The store's MLLM [the name its identity records: tiny, toy].")] = None,
    sam: Annotated[str | None, typer.Option(help="The store's SAM for real-SAM stores (vit_h:PATH).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 600,
    batch: Annotated[int, typer.Option(help="Queries per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate (LISA: 3e-4).")] = 3e-4,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank on q/v (LISA: 8); 0 fine-tunes the whole language model.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the new weights and the batches.")] = 0,
    threads: ThreadsOption = None,
) -> None:
    """Fine-tune the store's MLLM with a [SEG] token, its projection and SAM's mask decoder."""
    from .lisa_run import train_lisa

    with user_errors(output=out), _threads(threads):
        stats = train_lisa(cache, out, mllm=mllm, sam=sam, steps=steps, batch=batch, lr=lr, lora_rank=lora_rank,
                           seed=seed, log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(stats))


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Option(help="A lens-lisa train folder.")],
    cache: Annotated[str, typer.Option(help="The store to score on (held out).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write metrics.json and per_query.json here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N queries.")] = None,
    threads: ThreadsOption = None,
) -> None:
    """gIoU / cIoU, overall and per task (LISA's teacher-forced answer)."""
    from .lisa_run import evaluate_lisa

    with user_errors(output=out), _threads(threads):
        metrics = evaluate_lisa(run, cache, out=out, limit=limit, log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps({k: metrics[k] for k in ("giou", "ciou", "num_queries", "by_task")}))


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="A lens-lisa train folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the fine-tuned MLLM (llava-hf layout).")],
) -> None:
    """The fine-tuned MLLM (LoRA merged, [SEG] in its tokenizer) as a checkpoint folder."""
    from .lisa_run import export_mllm

    with user_errors(output=out):
        folder = export_mllm(run, out)
    typer.echo(f"wrote {folder}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
