"""Device, dtype and CPU-thread defaults shared by the backbones (one place, not one per model).

Public: stage 2 (``lens_train``) and the benchmarks resolve ``--device`` and run on the CPU with
:func:`cpu_threads` exactly as the backbones do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from lens_cache.errors import UsageError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device of every command's ``--device`` (stage 1 and stage 2 alike).

    ``None`` -> the first CUDA device when there is one, else the CPU. A string names ``cpu``,
    ``cuda`` or ``cuda:N``; a ``torch.device`` (library callers) is taken as it is.

    Raises:
        UsageError: a string that is not cpu/cuda[:N], or a CUDA device when none is visible (one line).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        resolved = device
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:  # torch's "Expected one of cpu, cuda, ... device type at start of device string"
            resolved = None
        if resolved is None or resolved.type not in ("cpu", "cuda"):
            raise UsageError(f"--device takes cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible: use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> bfloat16 on CUDA (what the real models run in), float32 elsewhere.

    Strings are torch dtype names (``"bfloat16"``, ``"float32"``, ``"float16"``).
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise UsageError(f"unknown dtype {dtype!r}: use e.g. 'bfloat16', 'float16' or 'float32'")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (JSON-friendly, for identities)."""
    return str(dtype).removeprefix("torch.")


def default_cpu_threads() -> int:
    """Intra-op threads for backbones on the CPU: half the usable cores, at least one.

    A cache build decodes images and compresses chunks in threads of its own while the
    backbones run; an OpenMP team as wide as the machine then busy-waits against them
    (and against any other process). On the 2-core machine this made the tiny build
    1.5-5x slower than with one thread (see ``BENCHMARKS.md``).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


@contextlib.contextmanager
def cpu_threads(threads: int | None, device: torch.device) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(threads)`` when ``device`` is the CPU; restored after.

    ``None`` means :func:`default_cpu_threads`. On a GPU nothing changes (yields the current count).
    """
    previous = torch.get_num_threads()
    if device.type != "cpu":
        yield previous
        return
    wanted = default_cpu_threads() if threads is None else int(threads)
    if wanted < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" progress bar off inside the block (a few-MB model loads at once;
    a bar on stderr would be noise before a one-line message)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
