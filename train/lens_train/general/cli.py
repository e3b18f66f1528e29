"""``lens-general``: the frozen MLLM's general abilities (MME) and the agent's routing.

A separate console script, not subcommands of ``lens-eval``: ``lens-eval`` is a
single-command app (``lens-eval --checkpoint RUN --cache STORE``), and adding
subcommands to it would change that usage.

Commands::

    lens-general general --benchmark mme --data-root DIR --mllm SPEC [--checkpoint RUN_DIR] [--limit N] [--out DIR]
    lens-general routing --benchmark FILE [--image-root DIR] --mllm SPEC [--tier-map a=b,...] [--out DIR]
    lens-general toy-mme --out DIR --images N
    lens-general toy-routing --out DIR --samples N

Heavy imports happen inside the commands, so ``--help`` answers at once. Bad input is
one line on stderr and exit 2 (``lens_train.cli.user_errors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import command_app, user_errors
from ..errors import UserError
from . import mme_eval, routing_eval

app = command_app(help="General abilities of the frozen MLLM (MME, Table 1) and the agent's routing benchmark.")

BENCHMARKS = ("mme",)

MllmOption = Annotated[str | None, typer.Option(help="tiny, toy, a llava-hf folder or HF-cache name (with --checkpoint: default the run's).")]
DeviceOption = Annotated[str | None, typer.Option(help="cpu or cuda [cuda when available].")]
DtypeOption = Annotated[str | None, typer.Option(help="Compute dtype [bfloat16 on cuda, float32 on cpu; with --checkpoint the run's].")]
ThreadsOption = Annotated[int | None, typer.Option(help="CPU threads for the models [half the cores].")]


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _threads(threads: int | None, device: str | None):
    """Run the models with ``threads`` CPU threads (no effect on a GPU)."""
    from lens_cache.backbones.runtime import cpu_threads, resolve_device  # torch: not for `--help`

    return cpu_threads(threads, resolve_device(device))


@app.command()
def general(
    data_root: Annotated[Path, typer.Option(help="MME_Benchmark_release_version/ (or the folder holding it).")],
    benchmark: Annotated[str, typer.Option(help="The benchmark: mme.")] = "mme",
    mllm: MllmOption = None,
    checkpoint: Annotated[Path | None, typer.Option(help="A lens-train run: also ask with LENS attached and compare.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N images of each subtask.")] = None,
    subtasks: Annotated[str | None, typer.Option(help="Comma-separated subtasks [all present].")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("lens-general-out/mme"),
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 10,
    prompt: Annotated[str, typer.Option(help="llava (LLaVA-1.5's MME prompt, Table 1), question (as written) or bare (without 'Please answer yes or no.').")] = "llava",
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines.")] = False,
) -> None:
    """MME scores of the frozen MLLM (LLaVA-1.5's prompt, MME's official scoring).

    No default backbone: --mllm SPEC, or --checkpoint RUN_DIR (then the run's MLLM unless
    --mllm names it).
    """
    with user_errors(output=out):
        if benchmark.lower() not in BENCHMARKS:
            raise UserError(f"--benchmark takes {', '.join(BENCHMARKS)}, got {benchmark!r} (routing: lens-general routing)")
        say = None if quiet else (lambda line: typer.echo(line, err=True))
        with _threads(threads, device):
            report = mme_eval.run_mme(data_root, mllm=mllm, out=out, checkpoint=checkpoint, limit=limit,
                                      subtasks=_split(subtasks), device=device, dtype=dtype,
                                      max_new_tokens=max_new_tokens, style=prompt, say=say)
    for line in mme_eval.summary_lines(report):
        typer.echo(line)
    typer.echo(f"wrote {report['files']['answers']} and {report['files']['scores']}")


@app.command()
def routing(
    benchmark: Annotated[Path, typer.Option(help="The routing benchmark: JSON lines or a JSON array.")],
    mllm: Annotated[str, typer.Option(help="tiny, toy, a llava-hf folder or HF-cache name.")],
    image_root: Annotated[Path | None, typer.Option(help="Folder the image paths are relative to [the file's folder].")] = None,
    tier_map: Annotated[str | None, typer.Option(help="Extra tier spellings: old=new,... (new: non-seg, explicit, reasoning, mixed).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("lens-general-out/routing"),
    fmt: Annotated[str, typer.Option("--format", help="Predictions as parquet or jsonl.")] = "parquet",
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines.")] = False,
) -> None:
    """Route every sample with the agent's router on the frozen MLLM; accuracy and trigger errors per tier.

    No default backbone: --mllm SPEC is required.
    """
    with user_errors(output=out):
        say = None if quiet else (lambda line: typer.echo(line, err=True))
        with _threads(threads, device):
            report = routing_eval.run_routing(benchmark, mllm=mllm, out=out, image_root=image_root,
                                              tier_map=tier_map, limit=limit, fmt=fmt, device=device, dtype=dtype,
                                              say=say)
    for line in routing_eval.summary_lines(report):
        typer.echo(line)
    typer.echo(f"wrote {report['files']['predictions']} and {report['files']['metrics']}")


@app.command("toy-mme")
def toy_mme(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write MME_Benchmark_release_version/ in.")],
    images: Annotated[int, typer.Option(help="Images per subtask (two questions each).")] = 10,
    subtasks: Annotated[str | None, typer.Option(help="Comma-separated: existence,count,position,color [all four].")] = None,
) -> None:
    """Write a toy MME from the synthetic world (held-out seed stream 2), in MME's release layout."""
    with user_errors(output=out):
        from .toy_mme import TOY_MME_SUBTASKS, write_toy_mme  # torch, numpy: imported here, not for `--help`

        root = write_toy_mme(out, images, _split(subtasks) or TOY_MME_SUBTASKS)
    typer.echo(f"wrote {root} (pass it as --data-root)")


@app.command("toy-routing")
def toy_routing(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for routing.jsonl and images/.")],
    samples: Annotated[int, typer.Option(help="Samples per tier.")] = 10,
) -> None:
    """Write a toy routing benchmark from the synthetic world (seed stream 3)."""
    with user_errors(output=out):
        from .toy_routing import write_toy_routing  # torch, numpy: imported here, not for `--help`

        path = write_toy_routing(out, samples)
    typer.echo(f"wrote {path} (pass it as --benchmark)")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
