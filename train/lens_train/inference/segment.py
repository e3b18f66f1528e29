"""``lens-segment``: segment images with a trained LENS head, running the frozen backbones live.

The work is done by :class:`~.segmenter.Segmenter` (:mod:`.segmenter`: live features through the
cached path, so a live result equals ``lens-eval``'s on a store of the same backbone) and the files by
:mod:`.result`; this module is the command line only (import the library's names from those two).

``--checkpoint`` takes a run folder (lens-train), a model folder (lens-export-model), ``toy`` (the head
shipped beside the toy backbones) or a Hugging Face Hub model id
(:func:`lens_train.training.model_folder.open_trained`).

Usage::

    lens-segment photo.jpg "the mug left of the laptop" --checkpoint runs/official -o out/
    # out/mask.png (0/255), out/overlay.png, out/panels.png, out/result.json
    lens-segment --jsonl jobs.jsonl --checkpoint toy -o out/
    # out/masks/000001.png, ..., out/results.jsonl (see lens_train.inference.batch_file); exit 2 if a line was skipped
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..cli import command_app, user_errors
from .options import CheckpointOption, DeviceOption, DtypeOption, MllmOption, SamOption, ThresholdOption
from ..errors import UserError
from .result import check_out_dir, write_result
from .segmenter import Segmenter, check_instruction, check_threshold, load_image, segment_image

__all__ = ["app"]

app = command_app(help="Segment images with a trained LENS head (frozen MLLM + SAM encoder run live).")


# ----------------------------------------------------------------------------- CLI


@app.command()
def segment(
    image: Annotated[Path | None, typer.Argument(help="Image file to segment (not with --jsonl).")] = None,
    instruction: Annotated[str | None, typer.Argument(help="What to segment (a sentence, or a phrase with --phrase).")] = None,
    checkpoint: CheckpointOption = ...,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: mask.png, overlay.png, panels.png, result.json "
                                      "(with --jsonl: masks/ and results.jsonl).")] = ...,
    jsonl: Annotated[Path | None, typer.Option(help="JSON lines, one {\"image\", \"instruction\"[, \"phrase\"]} "
                                               "object each: segment them all (bad lines are skipped, exit 2).")] = None,
    batch_size: Annotated[int, typer.Option(help="With --jsonl: distinct images per backbone forward.")] = 8,
    mllm: MllmOption = None,
    sam: SamOption = None,
    phrase: Annotated[bool, typer.Option("--phrase", help="INSTRUCTION is a short referring phrase: ask "
                                         "'Can you segment the {phrase} in this image?' (--jsonl: the default of lines without \"phrase\").")] = False,
    threshold: ThresholdOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Segment IMAGE by INSTRUCTION (or every line of --jsonl) with a trained LENS head; the frozen MLLM and SAM
    encoder run live.

    Default backbone: the head's own (the MLLM and SAM its training cache was built with, as recorded in its
    config.json); --mllm / --sam name them when they moved.
    """
    with user_errors(output=out):
        if jsonl is not None:
            if image is not None or instruction is not None:
                raise UserError("give IMAGE INSTRUCTION or --jsonl FILE, not both")
            _segment_jsonl(jsonl, checkpoint=checkpoint, out=out, batch_size=batch_size, mllm=mllm, sam=sam,
                           phrase=phrase, threshold=threshold, device=device, dtype=dtype)
            return
        if image is None or instruction is None:
            raise UserError("give IMAGE and INSTRUCTION (or --jsonl FILE)")
        check_instruction(instruction)  # these fail before any model is loaded
        check_out_dir(out)
        if threshold is not None:
            check_threshold(threshold)
        rgb = load_image(image)
        result = segment_image(rgb, instruction, run_dir=checkpoint, mllm=mllm, sam=sam, device=device, dtype=dtype,
                               threshold=threshold, is_sentence=not phrase)
        paths = write_result(out, result)
        summary = result.summary()
        typer.echo(f"{paths['mask']}: {summary['mask_pixels']} px ({100 * summary['mask_fraction']:.1f}%), "
                   f"{len(summary['keypoints_xy'])} keypoint(s); overlay {paths['overlay']}")


def _segment_jsonl(jsonl: Path, *, checkpoint: str, out: Path, batch_size: int, mllm: str | None, sam: str | None,
                   phrase: bool, threshold: float | None, device: str | None, dtype: str | None) -> None:
    """``--jsonl``: see :mod:`.batch_file` (bad lines on stderr; exit 2 after the rest if any)."""
    from .batch_file import RESULTS_FILE, read_jobs, run_jobs

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if threshold is not None:
        check_threshold(threshold)
    out = check_out_dir(out)
    jobs, bad = read_jobs(jsonl, phrase=phrase)  # before any model is loaded
    segmenter = Segmenter(checkpoint, mllm=mllm, sam=sam, device=device, dtype=dtype, threshold=threshold) if jobs else None
    out.mkdir(parents=True, exist_ok=True)
    if segmenter is None:
        for number, why in sorted(bad.items()):
            typer.echo(f"line {number}: {why}", err=True)
        raise UserError(f"no line of {jsonl} could be segmented ({len(bad)} skipped)")
    stats = run_jobs(segmenter, jobs, bad, out, batch_size=batch_size, threshold=threshold,
                     say=lambda line: typer.echo(line, err=True))
    typer.echo(f"segmented {stats['done']} item(s) of {jsonl} into {out / 'masks'} and {out / RESULTS_FILE} "
               f"({stats['items_per_s']:.2f} items/s)")
    if stats["skipped"]:
        raise UserError(f"{stats['skipped']} line(s) of {jsonl} skipped (listed above); the other {stats['done']} were "
                        f"segmented into {out}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
