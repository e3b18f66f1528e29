"""A plain-text progress line (images/s, queries/s, ETA) for long cache builds.

On a terminal the line is redrawn in place; in a log file (stderr redirected) a
new line is printed at most every ``log_interval_s`` seconds, so a day-long build
leaves a readable trace instead of megabytes of carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def say(enabled: bool, text: str) -> None:
    """Print one line of news of a build (``[lens-cache] text``) to stderr, unless not ``enabled``."""
    if enabled:
        print(f"[lens-cache] {text}", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``3h05m``, ``4m18s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Counts images and queries written; prints rates and an ETA to ``stream``.

    Args:
        total_images, total_queries: the whole store's sizes.
        done_images, done_queries: already written before this run (a resume); they
            count towards the fraction but not towards the rates.
        enabled: False prints nothing (``progress=False``).
        stream: where to print (default stderr).
        label: prefix of every line.
        log_interval_s: seconds between lines when ``stream`` is not a terminal.
    """

    def __init__(
        self,
        *,
        total_images: int,
        total_queries: int,
        done_images: int = 0,
        done_queries: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        label: str = "lens-cache",
        log_interval_s: float = 10.0,
    ) -> None:
        self.total_images = total_images
        self.total_queries = total_queries
        self.done_images = done_images
        self.done_queries = done_queries
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.log_interval_s = log_interval_s
        self._start = time.monotonic()
        self._new_images = 0
        self._new_queries = 0
        self._last_print = float("-inf")
        self._last_counts: tuple[int, int] | None = None
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        """The current progress line (no newline)."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        image_rate = self._new_images / elapsed
        query_rate = self._new_queries / elapsed
        remaining = self.total_images - self.done_images
        percent = 100.0 * self.done_images / max(self.total_images, 1)
        eta = format_duration(remaining / image_rate) if image_rate > 0 else "?"
        return (
            f"[{self.label}] {self.done_images}/{self.total_images} images ({percent:.1f}%), "
            f"{self.done_queries}/{self.total_queries} queries | {image_rate:.2f} img/s, "
            f"{query_rate:.2f} q/s | elapsed {format_duration(elapsed)}, ETA {eta}"
        )

    def advance(self, images: int, queries: int) -> None:
        """Record ``images`` more images and ``queries`` more queries written."""
        self.done_images += images
        self.done_queries += queries
        self._new_images += images
        self._new_queries += queries
        self._maybe_print()

    def message(self, text: str) -> None:
        """Print one line of news (resume, skipped images, ...), even between updates."""
        if self.enabled:
            self._write(f"[{self.label}] {text}", final=True)

    def close(self) -> None:
        """Print the final line (unless the last update already printed it, in a log)."""
        if not self.enabled:
            return
        if self._interactive or self._last_counts != (self.done_images, self.done_queries):
            self._write(self.line(), final=True)

    def _maybe_print(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        interval = 0.5 if self._interactive else self.log_interval_s
        if now - self._last_print >= interval:
            self._last_print = now
            self._last_counts = (self.done_images, self.done_queries)
            self._write(self.line(), final=False)

    def _write(self, text: str, *, final: bool) -> None:
        if self._interactive:
            # \x1b[K clears what a longer previous line left behind.
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
