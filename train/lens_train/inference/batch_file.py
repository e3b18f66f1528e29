"""``lens-segment --jsonl FILE -o OUT``: many (image, instruction) pairs from a JSON-lines file.

Each line is one object: ``{"image": PATH, "instruction": TEXT}``, optionally ``"phrase": true`` (ask the
referring template, as ``--phrase``). A relative image path is relative to the JSONL file's folder;
blank lines are ignored. Output::

    OUT/masks/000003.png    the mask of line 3 (0/255, the image's size)
    OUT/results.jsonl       one record per line, in file order: line, image, instruction, phrase, mask
                            (relative to OUT) and result.json's facts; or line and error for a skipped line

A bad line (not JSON, not an object, no image or instruction, an empty instruction, an image that is
missing or not an image) is reported as one line on stderr (``line N: why``) and skipped; the rest is
done. Exit status: 0 when every line was segmented, 2 (a user error) when any was skipped, after
writing everything else and a summary. Progress goes to stderr after each group of images
(items/s, ETA).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_core.files import replaced_on_success, write_text_atomically

from lens_cache.errors import UserError as AnyUserError  # stage 1's too: ImageReadError is one

from ..errors import UserError
from .result import mask_picture
from .segmenter import Segmenter, check_instruction, load_image

__all__ = ["Job", "read_jobs", "run_jobs"]

MASKS_DIR = "masks"
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Job:
    """One good line: its number (from 1), image path (resolved), instruction, and whether it is a phrase."""

    line: int
    image: Path
    instruction: str
    phrase: bool
    given_image: str


def _job(line: int, text: str, base: Path, phrase: bool) -> Job:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(values, dict):
        raise UserError("not a JSON object: give {\"image\": PATH, \"instruction\": TEXT}")
    image, instruction = values.get("image"), values.get("instruction")
    if not isinstance(image, str) or not image.strip():
        raise UserError("no \"image\" (a path)")
    if instruction is None:
        raise UserError("no \"instruction\"")
    check_instruction(instruction)
    given = values.get("phrase", phrase)
    if not isinstance(given, bool):
        raise UserError(f"\"phrase\" is true or false, got {given!r}")
    path = Path(image).expanduser()
    return Job(line=line, image=path if path.is_absolute() else base / path, instruction=instruction, phrase=given,
               given_image=image)


def read_jobs(path: Path, *, phrase: bool = False) -> tuple[list[Job], dict[int, str]]:
    """The good lines of ``path`` and, by line number, why each bad one is bad (images are not read here).

    Raises:
        UserError: the file is missing, unreadable, or holds no line at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--jsonl {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--jsonl {path} cannot be read ({type(error).__name__})") from None
    jobs, bad = [], {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            jobs.append(_job(number, text, path.parent, phrase))
        except AnyUserError as error:
            bad[number] = str(error)
    if not jobs and not bad:
        raise UserError(f"--jsonl {path} holds no line: one JSON object per line, {{\"image\": ..., \"instruction\": ...}}")
    return jobs, bad


def _seconds(value: float) -> str:
    value = max(0, int(round(value)))
    return f"{value // 60}m{value % 60:02d}s" if value >= 60 else f"{value}s"


def run_jobs(segmenter: Segmenter, jobs: list[Job], bad: dict[int, str], out: Path, *, batch_size: int = 8,
             threshold: float | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Segment ``jobs`` into ``out`` (masks/ and results.jsonl), ``batch_size`` distinct images at a time.

    A job whose image cannot be read joins ``bad`` (reported with ``say`` as ``line N: why``). Returns
    ``{"done", "skipped", "seconds", "items_per_s"}``.
    """
    import numpy as np  # heavy: loaded with the models
    from PIL import Image

    masks = out / MASKS_DIR
    masks.mkdir(parents=True, exist_ok=True)
    for number, why in sorted(bad.items()):
        say(f"line {number}: {why}")
    by_image: dict[Path, list[Job]] = {}
    for job in jobs:
        by_image.setdefault(job.image.resolve(), []).append(job)
    groups = list(by_image.items())
    records: dict[int, dict[str, Any]] = {n: {"line": n, "error": why} for n, why in bad.items()}
    started, done, total = time.perf_counter(), 0, len(jobs)
    for start in range(0, len(groups), batch_size):
        items, owners = [], []
        for path, members in groups[start:start + batch_size]:
            try:
                rgb = load_image(path)  # once per image; the PIL object keeps its instructions together
            except AnyUserError as error:
                for job in members:
                    bad[job.line] = str(error)
                    records[job.line] = {"line": job.line, "error": str(error)}
                    say(f"line {job.line}: {error}")
                total -= len(members)
                continue
            items += [(rgb, job.instruction, not job.phrase) for job in members]
            owners += members
        if items:
            for job, result in zip(owners, segmenter.batch(items, batch_size=batch_size, threshold=threshold)):
                name = f"{MASKS_DIR}/{job.line:06d}.png"
                with replaced_on_success(out / name, suffix=".tmp.png") as tmp:
                    mask_picture(result.mask).save(tmp, format="PNG")
                summary = result.summary()
                records[job.line] = {"line": job.line, "image": job.given_image, "phrase": job.phrase, "mask": name,
                                     **summary}
            done += len(owners)
        elapsed = time.perf_counter() - started
        rate = done / max(elapsed, 1e-9)
        say(f"[lens-segment] {done}/{total} items ({rate:.2f} items/s, ETA {_seconds((total - done) / max(rate, 1e-9))})")
    write_text_atomically(out / RESULTS_FILE, "".join(json.dumps(records[n]) + "\n" for n in sorted(records)))
    seconds = time.perf_counter() - started
    return {"done": done, "skipped": len(bad), "seconds": seconds, "items_per_s": done / max(seconds, 1e-9)}
