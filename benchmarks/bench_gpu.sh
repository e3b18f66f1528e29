#!/usr/bin/env bash
# The real-dimension benchmarks on one GPU (H100 / H200), in at most 8 minutes: what `make bench-gpu` runs
# the first time a GPU is lent. Each benchmark has its own time limit, so one that hangs leaves the others
# their time; each writes its JSON line to $OUT_DIR (default work/bench-gpu, or $OUT on the device machine),
# and the summary at the end prints them with the date and the GPU's name, ready for BENCHMARKS.md.
#
#   1. bench-cache  (3 min): stage 1 at LLaVA-1.5-7B + SAM ViT-H dimensions, random bf16 weights, 16 images
#   2. bench-train  (2 min): the `official` stage-2 step, batch 2 and 8, step time and peak GPU memory
#                            (compare with benchmarks/bench_train_memory.py's CPU count, BENCHMARKS.md)
#   3. bench-loader (2 min): loader samples/s from a d=4096 store, 1 and 8 workers
set -u
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-${OUT:-work/bench-gpu}}
mkdir -p "$OUT_DIR"
started=$(date +%s)

run() {  # run NAME SECONDS COMMAND...: time-limited, its JSON kept, its log beside it
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  grep '^{' "$OUT_DIR/$name.log" | tail -1 > "$OUT_DIR/$name.json" || true
  echo "   rc=$rc, $(( $(date +%s) - started ))s elapsed; $(cat "$OUT_DIR/$name.json" | cut -c1-300)"
}

run bench-cache 180 "$PY" benchmarks/bench_cache.py --scale real --images 16 --baseline-queries 4
run bench-train-b2 60 "$PY" benchmarks/bench_train_step.py --preset official --batch-size 2 --steps 10
run bench-train-b8 60 "$PY" benchmarks/bench_train_step.py --preset official --batch-size 8 --steps 5 --warmup 2
run bench-loader-w1 60 "$PY" benchmarks/bench_loader.py --hidden-size 4096 --images 32 --workers 1 --batches 40
run bench-loader-w8 60 "$PY" benchmarks/bench_loader.py --hidden-size 4096 --images 32 --workers 8 --batches 100

echo "== summary: $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(( $(date +%s) - started ))s"
for file in "$OUT_DIR"/*.json; do echo "$(basename "$file" .json): $(cat "$file")"; done
