"""Latency of the web demo (lens-serve) as a client sees it: start-up to first result, then per request.

Starts ``python -m lens_train.inference.serve`` in a subprocess (the console command), waits for its
page, then calls its ``/segment`` endpoint with gradio_client (upload + segmentation + the pictures
and the mask file), cycling through the shipped example images. Reports:

* ``ready_s``: process start -> the page answers (imports, model load, Gradio start-up);
* ``first_result_s``: process start -> the first segmentation is back (what a user waits after launching);
* per-request latency of the following requests: median, min, max.

Usage::

    python benchmarks/bench_serve.py                                  # the shipped toy head, CPU
    python benchmarks/bench_serve.py --checkpoint runs/x --requests 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="toy")
    parser.add_argument("--mllm")
    parser.add_argument("--sam")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=6, help="requests after the first one")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    from lens_train.inference.serve import EXAMPLES, EXAMPLES_DIR

    port = free_port()
    command = [sys.executable, "-m", "lens_train.inference.serve", "--checkpoint", args.checkpoint,
               "--device", args.device, "--port", str(port)]
    command += ["--mllm", args.mllm] if args.mllm else []
    command += ["--sam", args.sam] if args.sam else []
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    url = f"http://127.0.0.1:{port}/"
    log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"lens-serve exited with {server.returncode}; log: {log.name}\n{Path(log.name).read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
            if time.perf_counter() - started > args.timeout:
                sys.exit(f"lens-serve did not answer within {args.timeout} s; log: {log.name}")
        ready = time.perf_counter() - started
        client = Client(url, verbose=False)
        latencies, statuses = [], []
        for i in range(args.requests + 1):
            name, instruction = EXAMPLES[i % len(EXAMPLES)]
            t0 = time.perf_counter()
            outputs = client.predict(handle_file(str(EXAMPLES_DIR / name)), instruction, api_name="/segment")
            latencies.append(time.perf_counter() - t0)
            statuses.append(outputs[-1])
            if i == 0:
                first = time.perf_counter() - started
            if outputs[4] is None:
                sys.exit(f"request {i} failed: {outputs[-1]}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    rest = latencies[1:] or latencies
    report = {
        "checkpoint": args.checkpoint, "device": args.device, "threads": args.threads or "default",
        "ready_s": round(ready, 2), "first_result_s": round(first, 2), "first_request_s": round(latencies[0], 3),
        "per_request_s": {"median": round(statistics.median(rest), 3), "min": round(min(rest), 3),
                          "max": round(max(rest), 3), "n": len(rest)},
        "example_status": statuses[0],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
