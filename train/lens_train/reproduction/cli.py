"""``python -m lens_train.reproduction``: the command line of the reproductions.

``table1`` (:mod:`.table1`), ``table2``, ``table3`` and ``demo`` (:mod:`.reproduce`); ``make reproduce-table1/2/3``
and ``make demo`` call it. The tables take the same options (``make`` passes one ``REPRO_ARGS``; ``--seeds`` and
``--runs`` are Table 2's alone), an empty
value meaning unset; user errors are one line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..cli import command_app, user_errors
from ..errors import UserError
from . import reproduce, table1 as table_one
from .reproduce import DEMO_IMAGES, TINY_TABLE_STEPS, Settings

PROG = "python -m lens_train.reproduction"
app = command_app(
    name=PROG, no_args_is_help=True,
    help="Reproduce the paper's tables end to end: caches -> training runs -> evaluations -> Markdown. "
         "A rerun continues where an interrupted one stopped.",
)

# The options every command takes (`make` passes the same REPRO_ARGS to each; an empty value is unset).
DataRootOption = Annotated[str | None, typer.Option(help="LISA-style dataset folder (DATA_ROOT); real presets only.")]
MllmOption = Annotated[str | None, typer.Option(
    help="LLaVA-1.5 folder or HF id (MLLM); real presets only [synthetic presets: their own].")]
SamOption = Annotated[str | None, typer.Option(help="vit_h:PATH (SAM); real presets only [synthetic presets: their own].")]
WorkOption = Annotated[str | None, typer.Option(help="Where stores/ and runs/ go [work/<preset>; demo: work/demo-<preset>; table1: work/table1-<preset>].")]
ResultsOption = Annotated[str, typer.Option(help="Where the tables go.")]
DeviceOption = Annotated[str | None, typer.Option(help="cpu or cuda [cuda when available].")]
StepsOption = Annotated[int | None, typer.Option(
    help=f"Override the preset's training steps [preset's; tiny tables: {TINY_TABLE_STEPS}].")]
SeedsOption = Annotated[str, typer.Option(help="Table 2: comma-separated training seeds.")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress lines.")]
TABLE_PRESETS = "paper, official, toy or tiny (the last two: synthetic data, CPU)"


def _run(what: str, *, preset: str, data_root: str | None, mllm: str | None, sam: str | None, work: str | None,
         results: str, device: str | None, steps: int | None, tiny_images: int, seeds: str, quiet: bool,
         mme_root: str | None = None, lisa_mllm: str | None = None, runs: str | None = None) -> None:
    """Settings from the options, then the table (user errors: one line, exit 2)."""
    with user_errors(also=(FileNotFoundError,)):
        if steps is None and preset == "tiny" and what != "demo":
            steps = TINY_TABLE_STEPS
        try:
            seed_list = tuple(int(v) for v in seeds.split(",") if v.strip())
        except ValueError:
            raise UserError(f"--seeds takes comma-separated integers (e.g. 0,1,2), got {seeds!r}") from None
        default_work = {"demo": f"work/demo-{preset}", "table1": f"work/table1-{preset}"}.get(what, f"work/{preset}")
        settings = Settings(preset=preset, work=Path(work or default_work),
                            results=Path(results), data_root=Path(data_root) if data_root else None,
                            mllm=mllm or None, sam=sam or None, device=device or None, steps=steps,
                            tiny_images=tiny_images, quiet=quiet, seeds=seed_list,
                            mme_root=Path(mme_root) if mme_root else None, lisa_mllm=lisa_mllm or None,
                            runs=tuple(v.strip() for v in runs.split(",") if v.strip()) if runs else None)
        # looked up at call time (tests replace the stages)
        stage = {"table1": lambda: table_one.reproduce_table1, "table2": lambda: reproduce.reproduce_table2,
                 "table3": lambda: reproduce.reproduce_table3, "demo": lambda: reproduce.demo}[what]()
        stage(settings)


@app.command(short_help="Table 1: general abilities kept (LENS) vs lost (LISA-style) [default preset: toy].")
def table1(
    preset: Annotated[str, typer.Option(help="toy (everything on the CPU) or paper (real weights and data).")] = "toy",
    data_root: DataRootOption = None,
    mllm: MllmOption = None,
    sam: SamOption = None,
    work: WorkOption = None,
    results: ResultsOption = "results",
    device: DeviceOption = None,
    steps: Annotated[int | None, typer.Option(help="Training steps of both runs [LENS: preset's; LISA-style: 600].")] = None,
    tiny_images: Annotated[int, typer.Option(help="Synthetic images per split and set.")] = DEMO_IMAGES,
    quiet: QuietOption = False,
    mme_root: Annotated[str | None, typer.Option(help="MME_Benchmark_release_version/ (MME_ROOT); paper preset.")] = None,
    lisa_mllm: Annotated[str | None, typer.Option(
        help="A LISA-style MLLM as a llava-hf folder (lens-lisa export) for the LISA row; paper preset, optional.")] = None,
) -> None:
    """Table 1: random guess, the MLLM alone, a LISA-style fine-tune and LENS; training memory, time and
    parameters, held-out segmentation, MME, VQA by type.

    Default preset: toy (results/table1-toy.md; CPU, about 20 minutes). --preset paper (results/table1.md)
    reads LLaVA-1.5-7B, the data and SAM as Table 2 does (--data-root, --mllm, --sam), reuses Table 2's LENS
    run (trained if absent) and asks MME from --mme-root with the MLLM alone and with LENS attached; the LISA
    row needs --lisa-mllm.
    """
    _run("table1", preset=preset or "toy", data_root=data_root, mllm=mllm, sam=sam, work=work, results=results,
         device=device, steps=steps, tiny_images=tiny_images, seeds="0", quiet=quiet, mme_root=mme_root,
         lisa_mllm=lisa_mllm)


@app.command(short_help="Table 2 (ReasonSeg): LENS and its ablations [default preset: toy].")
def table2(
    preset: Annotated[str, typer.Option(help=TABLE_PRESETS + ".")] = "toy",
    data_root: DataRootOption = None,
    mllm: MllmOption = None,
    sam: SamOption = None,
    work: WorkOption = None,
    results: ResultsOption = "results",
    device: DeviceOption = None,
    steps: StepsOption = None,
    tiny_images: Annotated[int, typer.Option(help="Synthetic images per split and set (toy, tiny).")] = 16,
    seeds: SeedsOption = "0",
    quiet: QuietOption = False,
    runs: Annotated[str | None, typer.Option(
        help="Comma-separated rows to train (lens, layer30, no_keypoint_description, no_global_description, "
             "no_attn_loss) [all; lens always].")] = None,
) -> None:
    """Table 2 (ReasonSeg): the caches, LENS and its four ablations, their val/test scores, results/table2.md.

    Default preset: toy (synthetic data, the shipped toy backbones, CPU). The paper's table is
    --preset paper (LLaVA-1.5-7B + SAM ViT-H on the real data: needs --data-root, --mllm, --sam).
    """
    _run("table2", preset=preset or "toy", data_root=data_root, mllm=mllm, sam=sam, work=work, results=results,
         device=device, steps=steps, tiny_images=tiny_images, seeds=seeds, quiet=quiet, runs=runs)


@app.command(short_help="Table 3 (RefCOCO/+/g cIoU) of Table 2's LENS run [default preset: toy].")
def table3(
    preset: Annotated[str, typer.Option(help=TABLE_PRESETS + ".")] = "toy",
    data_root: DataRootOption = None,
    mllm: MllmOption = None,
    sam: SamOption = None,
    work: WorkOption = None,
    results: ResultsOption = "results",
    device: DeviceOption = None,
    steps: StepsOption = None,
    tiny_images: Annotated[int, typer.Option(help="Synthetic images per split and set (toy, tiny).")] = 16,
    quiet: QuietOption = False,
) -> None:
    """Table 3 (RefCOCO/+/g cIoU) of Table 2's LENS run, results/table3.md.

    Default preset: toy (synthetic data, the shipped toy backbones, CPU). The paper's table is
    --preset paper (LLaVA-1.5-7B + SAM ViT-H on the real data: needs --data-root, --mllm, --sam).
    """
    _run("table3", preset=preset or "toy", data_root=data_root, mllm=mllm, sam=sam, work=work, results=results,
         device=device, steps=steps, tiny_images=tiny_images, seeds="0", quiet=quiet)


@app.command("demo", short_help="The whole pipeline on the synthetic world (make demo) [default preset: toy].")
def demo_command(
    preset: Annotated[str, typer.Option(help="toy (the shipped pretrained toy backbones) or tiny (random ones).")] = "toy",
    data_root: DataRootOption = None,
    mllm: MllmOption = None,
    sam: SamOption = None,
    work: WorkOption = None,
    results: ResultsOption = "results",
    device: DeviceOption = None,
    steps: Annotated[int | None, typer.Option(help="Override the preset's training steps [preset's].")] = None,
    tiny_images: Annotated[int, typer.Option(help="Synthetic images per split and set.")] = DEMO_IMAGES,
    quiet: QuietOption = False,
) -> None:
    """The whole pipeline on the synthetic world (make demo): cache -> train -> eval on held-out
    synthetic:val -> results/demo.md + figures.

    Default preset: toy (the project's toy LLaVA and SAM, pretrained on synthetic scenes and
    shipped in cache/lens_cache/backbones/toy_weights; CPU, minutes).
    """
    _run("demo", preset=preset or "toy", data_root=data_root, mllm=mllm, sam=sam, work=work, results=results,
         device=device, steps=steps, tiny_images=tiny_images, seeds="0", quiet=quiet)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit status
    (0; 2 for a user error, printed as one line)."""
    try:
        app(args=argv, prog_name=PROG)
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
