#!/usr/bin/env bash
# The authors' structure at toy scale (FIDELITY.md, RESULTS.md "The authors' structure at toy scale").
#
# Trains LENS on the toy backbones' synthetic:train store with the toy preset as it was (the project's
# structure), with the authors' structure (rows 3-8 of FIDELITY.md), and with each of rows 3, 4, 5, 7 and 9
# switched back (row 9: the authors' schedule and pure-bf16 weights added instead; row9s: their schedule in
# fp32, since bf16 on a CPU runs 6x slower), then evaluates every run
# on held-out synthetic:val (513 queries). Stores come from `make demo` (python -m lens_train.reproduction demo
# --work WORK): WORK/stores/synthetic-{train,val}-L3.
#
#   bash benchmarks/fidelity_toy.sh WORK [SEEDS] [VARIANTS]   e.g. WORK=work/fid SEEDS="0 1 2"
#
# Writes WORK/fidelity/<variant>-s<seed>/ (run + eval) and prints one line per run: variant seed gIoU cIoU.
set -euo pipefail
WORK=${1:?usage: fidelity_toy.sh WORK [SEEDS] [VARIANTS]}
SEEDS=${2:-0}
VARIANTS=${3:-"project authors row3 row4 row5 row7 row9"}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
TRAIN="$WORK/stores/synthetic-train-L3"
VAL="$WORK/stores/synthetic-val-L3"

AUTHORS="--set head_input=full_sequence --set final_norm=true --set descriptor=official
  --set global_only_after_descriptor=true --set coords=align_corners --set keypoint_strict=true
  --set detach_subpixel=false --set cls_position_std=1.0 --set train_iou_head=false
  --set attn_target_resize=nearest"
settings() {
  case "$1" in
    project) echo "" ;;                                       # the toy preset as it was
    authors) echo "$AUTHORS" ;;                               # rows 3-8 as the authors' code
    row3) echo "$AUTHORS --set head_input=image_text" ;;     # ... but the paper's [F_i; F_t]
    row4) echo "$AUTHORS --set final_norm=false" ;;          # ... without the final norm
    row5) echo "$AUTHORS --set descriptor=paper" ;;          # ... with the project's descriptor
    row7) echo "$AUTHORS --set coords=cell_center --set keypoint_strict=false --set attn_target_resize=area" ;;
    row9) echo "$AUTHORS --set lr_schedule=constant --set warmup_steps=0 --set grad_clip=null --set precision=bf16-pure" ;;
    row9s) echo "$AUTHORS --set lr_schedule=constant --set warmup_steps=0 --set grad_clip=null" ;;  # row 9 in fp32
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

for variant in $VARIANTS; do
  for seed in $SEEDS; do
    out="$WORK/fidelity/$variant-s$seed"
    if [ ! -f "$out/eval/metrics.json" ]; then
      rm -rf "$out"; mkdir -p "$WORK/fidelity"
      # shellcheck disable=SC2046
      "$BIN/lens-train" --cache "$TRAIN" --preset toy --seed "$seed" --out "$out/run" --device cpu \
        --quiet $(settings "$variant") >"$out.train.log" 2>&1 || { echo "$variant $seed FAILED (see $out.train.log)"; continue; }
      "$BIN/lens-eval" --checkpoint "$out/run" --cache "$VAL" --out "$out/eval" --figures 4 --device cpu \
        >"$out.eval.log" 2>&1 || { echo "$variant $seed EVAL FAILED (see $out.eval.log)"; continue; }
    fi
    "$PY" - "$variant" "$seed" "$out/eval/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[3]))
print(f"{sys.argv[1]} seed {sys.argv[2]} gIoU {100 * m['giou']:.1f} cIoU {100 * m['ciou']:.1f} n {m['num_queries']}", flush=True)
EOF
  done
done
