"""Peak memory of `lens-segment` on a very large image (issue 24 row 1), with the shipped toy head.

Writes all-black RGB PNGs of SIDE x SIDE pixels (a few hundred KB each: zeros compress) into WORK once,
then runs `lens-segment IMAGE "the red circle" --checkpoint toy --device cpu -o OUT` in a child process
per image and reads the child's own peak resident memory (``os.wait4``'s ``ru_maxrss``) and wall time.
The same for a small image as the baseline (the models alone).

    python benchmarks/bench_large_image.py --work /tmp/large --sides 512,13000,16384

Prints one line per image and, with --json, writes the rows there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def black_png(work: Path, side: int) -> Path:
    path = work / f"black-{side}.png"
    if not path.is_file():
        Image.MAX_IMAGE_PIXELS = None
        Image.new("RGB", (side, side)).save(path, compress_level=9)
    return path


def run(image: Path, out: Path) -> dict:
    command = [str(Path(sys.executable).with_name("lens-segment")), str(image), "the red circle", "--checkpoint",
               "toy", "--device", "cpu", "-o", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = child.stdout.read().decode(), child.stderr.read().decode()
    return {"image": image.name, "bytes": image.stat().st_size, "exit": os.waitstatus_to_exitcode(status),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1),
            "output": (stdout or stderr).strip().splitlines()[-1:] }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sides", default="512,13000,16384")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for side in (int(v) for v in args.sides.split(",")):
        row = {"side": side, **run(black_png(args.work, side), args.work / f"out-{side}")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
