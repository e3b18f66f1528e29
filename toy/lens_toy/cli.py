"""``lens-toy``: pretrain, evaluate and export the toy-world backbones.

    lens-toy pretrain-sam   --work toy_work --steps 2400      # toy SAM, resumable
    lens-toy pretrain-llava --work toy_work                   # toy LLaVA, three stages, resumable
    lens-toy export         --work toy_work --out cache/lens_cache/backbones/toy_weights
    lens-toy evaluate       [--weights cache/lens_cache/backbones/toy_weights]     # held-out scores of shipped weights
    lens-toy probe-referent [--mllm toy] --out results/probe-referent           # does layer k know the referent?

Every command is deterministic from ``--seed``; rerunning a killed command resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def _group() -> None:
    """Toy-world backbones: pretrain, evaluate, export."""


def _threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


@app.command("pretrain-sam")
def pretrain_sam_cmd(
    work: Annotated[Path, typer.Option(help="Folder for checkpoints and logs.")] = Path("toy_work"),
    steps: Annotated[int, typer.Option(help="Optimizer steps (2 images x 8 prompts each).")] = 2400,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
) -> None:
    """Pretrain the toy SAM on toy scenes with point and box prompts; report held-out mIoU."""
    import json

    from .sam import evaluate_sam, pretrain_sam

    _threads(threads)
    sam = pretrain_sam(work, steps=steps, lr=lr, seed=seed)
    torch.save(sam.state_dict(), work / "sam_final.pt")
    scores = evaluate_sam(sam)
    (work / "sam_eval.json").write_text(json.dumps(scores, indent=1))
    typer.echo(f"toy SAM held-out: {scores}")


@app.command("pretrain-llava")
def pretrain_llava_cmd(
    work: Annotated[Path, typer.Option(help="Folder for checkpoints and logs.")] = Path("toy_work"),
    vision_steps: Annotated[int, typer.Option(help="Stage a: vision tower, 16 scenes a step.")] = 3600,
    align_steps: Annotated[int, typer.Option(help="Stage b: captions, --batch scenes a step.")] = 200,
    instruct_steps: Annotated[int, typer.Option(help="Stage c: conversations, --batch scenes a step.")] = 4200,
    batch: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
) -> None:
    """Pretrain the toy LLaVA in three stages (vision tower, alignment, instruction tuning)."""
    import json

    from .llava import evaluate_llava, evaluate_vision, pretrain_llava

    _threads(threads)
    model, processor = pretrain_llava(work, vision_steps=vision_steps, align_steps=align_steps,
                                      instruct_steps=instruct_steps, batch=batch, seed=seed)
    model.save_pretrained(work / "llava_final")
    processor.save_pretrained(work / "llava_final")
    scores = {"vision_tower": evaluate_vision(work, seed=seed), **evaluate_llava(model, processor)}
    (work / "llava_eval.json").write_text(json.dumps(scores, indent=1))
    typer.echo(f"toy LLaVA held-out: {json.dumps(scores)}")


@app.command("export")
def export_cmd(
    work: Annotated[Path, typer.Option(help="The pretraining folder.")] = Path("toy_work"),
    out: Annotated[Path | None, typer.Option(
        help="Where the shipped weights go (default: cache/lens_cache/backbones/toy_weights).")] = None,
    command: Annotated[str, typer.Option(help="The commands that made the weights, for the manifest.")] = "",
) -> None:
    """Write the pretrained toy backbones as shipped weights + MANIFEST.json (hashes, scores, provenance)."""
    from .export import export_weights

    path = export_weights(work, out, command=command)
    typer.echo(f"wrote {path}")


@app.command("evaluate")
def evaluate_cmd(
    weights: Annotated[Path | None, typer.Option(
        help="Folder of shipped weights (default: cache/lens_cache/backbones/toy_weights).")] = None,
    scenes: Annotated[int, typer.Option(help="Held-out scenes per model.")] = 40,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
) -> None:
    """Held-out scores of the shipped toy backbones (SAM single-point mIoU; LLaVA answers, boxes, pointing)."""
    import json

    from .export import load_toy_llava, load_toy_sam
    from .llava import evaluate_llava
    from .sam import evaluate_sam

    _threads(threads)
    sam = evaluate_sam(load_toy_sam(weights), scenes=scenes)
    llava = evaluate_llava(*load_toy_llava(weights), scenes=scenes)
    typer.echo(json.dumps({"sam": sam, "llava": llava}, indent=1))


@app.command("probe-referent")
def probe_referent_cmd(
    mllm: Annotated[str, typer.Option(help="MLLM: toy, tiny, or a checkpoint folder (lens-cache build's --mllm).")] = "toy",
    layers: Annotated[str | None, typer.Option(
        help="hidden_states indices, comma-separated [every decoder layer's: 1 .. the MLLM's count].")] = None,
    lens_layer: Annotated[int | None, typer.Option(help="Layer LENS reads, marked in the table [the MLLM's default].")] = None,
    train_scenes: Annotated[int, typer.Option(help="Training scenes per task (one question each).")] = 400,
    held_out_scenes: Annotated[int, typer.Option(help="Held-out scenes per task, from another seed.")] = 200,
    token: Annotated[str, typer.Option(
        help="The state probed: last (the start-of-answer token) or mean (every text token after the image).")] = "last",
    out: Annotated[Path, typer.Option(help="Folder for probe.json, probe.md and probe.png.")] = Path(
        "results/probe-referent"),
    device: Annotated[str, typer.Option()] = "cpu",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
) -> None:
    """Does the MLLM's last prompt token know which object the question picks out? A linear probe by layer
    and task, trained on training scenes and scored on held-out ones, with chance (see lens_toy.referent_probe)."""
    import time

    from lens_cache.backbones import BUILTIN_MLLMS, build_mllm, default_layers
    from lens_cache.backbones.mllm import load_mllm_config

    from .referent_probe import TOKENS, report_markdown, run_probe, write_report

    if token not in TOKENS:
        raise typer.BadParameter(f"{token!r}: one of {', '.join(TOKENS)}", param_hint="--token")
    _threads(threads)
    if layers:
        chosen = [int(k) for k in layers.split(",")]
    else:  # every decoder layer's output (hidden_states 1 .. L)
        count = (build_mllm(mllm, layers=[1]).num_hidden_layers if mllm in BUILTIN_MLLMS
                 else load_mllm_config(mllm).get_text_config().num_hidden_layers)
        chosen = list(range(1, count + 1))
    if lens_layer is None:
        lens_layer = default_layers(mllm)[0]
    probe_mllm = build_mllm(mllm, layers=chosen, device=device)
    start = time.monotonic()

    def progress(task: str, done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            typer.echo(f"[probe] {task}: {done}/{total} scenes ({time.monotonic() - start:.0f} s)", err=True)

    report = run_probe(probe_mllm, train_scenes=train_scenes, held_out_scenes=held_out_scenes, progress=progress,
                       token=token)
    report["lens_layer"] = lens_layer
    write_report(report, out, lens_layer)
    typer.echo(report_markdown(report, lens_layer))
    typer.echo(f"wrote {out}/probe.json, probe.md, probe.png")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
