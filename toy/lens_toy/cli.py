"""``lens-toy``: pretrain, evaluate and export the toy-world backbones.

    lens-toy pretrain-sam   --work toy_work --steps 2400      # toy SAM, resumable
    lens-toy pretrain-llava --work toy_work                   # toy LLaVA, three stages, resumable
    lens-toy export         --work toy_work --out cache/lens_cache/backbones/toy_weights
    lens-toy evaluate       [--weights cache/lens_cache/backbones/toy_weights]     # held-out scores of shipped weights

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
