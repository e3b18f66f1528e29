"""A run's record of its steps: ``metrics.jsonl`` (one row per optimizer step), the progress line, ``curve.png``.

:func:`lens_train.training.trainer.train` appends a row after every optimizer step (flushed at once, so a
crash loses at most the step it was in); on resume the rows past the checkpoint are dropped
(:func:`rewrite_metrics`) and recomputed. A row holds the step's loss parts, lr, gradient norm,
samples/s and the seconds since the run (or its resumption) started.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lens_core.files import write_text_atomically

from ..figures import write_curve

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "curve.png"


def metrics_rows(run_dir: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``run_dir``'s metrics.jsonl (steps ``<= up_to`` when given); a torn last line is left out."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:  # torn by a crash or a full disk while it was appended
        pass
    return [r for r in rows if up_to is None or r["step"] <= up_to]


def rewrite_metrics(run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Keep only rows up to the checkpoint (a crash after it may have logged more steps)."""
    write_text_atomically(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def format_seconds(seconds: float) -> str:
    """``1h02m`` or ``3m05s``."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(row: dict[str, Any], *, steps: int, rate: float, samples: int) -> str:
    """The line logged for the metrics ``row`` of a run of ``steps`` steps, going at ``rate`` steps/s of
    ``samples`` samples each."""
    done = row["step"]
    eta = format_seconds((steps - done) / max(rate, 1e-9))
    return (f"step {done}/{steps} | loss {row['loss']:.4f} (seg {row['seg']:.4f}: dice {row['dice']:.4f} "
            f"bce {row['bce']:.4f}; attn {row['attn']:.4f}) | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
            f"{rate:.2f} steps/s, {rate * samples:.1f} samples/s | ETA {eta}")


def write_curve_quietly(run_dir: Path, rows: Sequence[dict[str, Any]], *, warn: bool = True) -> None:
    """Write the training curve; a failure is a warning (``warn``), never the run's outcome."""
    try:
        write_curve(run_dir / CURVE_FILE, rows)
    except Exception as error:  # a figure must never hide the run's real outcome
        if warn:
            print(f"warning: could not write {CURVE_FILE}: {error}", file=sys.stderr)
