#!/usr/bin/env bash
# The CPU-scale study (benchmarks/README.md, "Paper comparisons at CPU scale"), every command in one
# place. Each line is a `relora-ds compare` of the base config benchmarks/study/20m-sotu.yaml with one factor
# changed (--set), into its own directory under $OUT; compare is resumable, so rerunning this script continues
# where it stopped and skips what finished. ~7.5 min per variant on 2 CPU cores (1 200 steps of 8 x 128 tokens).
#
#   bash benchmarks/study/run.sh [main|ablations|all]    # default all; then:
#   python benchmarks/study/summarize.py                  # the tables, into benchmarks/results/<date>-study-20m/
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/study-20m}
BASE=benchmarks/study/20m-sotu.yaml
what=${1:-all}

compare() {  # compare OUT_SUBDIR VARIANTS [--set k=v ...]
    local dir=$1 variants=$2
    shift 2
    "$PY" -m relora_ds compare --config "$BASE" --variants "$variants" --out "$OUT/$dir" "$@"
}

if [[ $what == main || $what == all ]]; then
    # The paper's Table 2 (full, lora, lora_warm, relora) and Table 6 (leave one component out).
    compare main full,lora,lora_warm,relora,no_reset,no_jagged,no_warm
fi
if [[ $what == ablations || $what == all ]]; then
    # One factor at a time against the base (LR 1x, cycle 300, pair_moments on, r 16, warm start 300 = 25%), and
    # the base itself again (on the machine the ablations run on, when it is not the main comparison's).
    compare base-rerun lora_warm,relora
    compare lr-1.5x lora_warm,relora --set schedule.low_rank_lr_scale=1.5
    compare lr-2x lora_warm,relora --set schedule.low_rank_lr_scale=2
    compare cycle-100 relora --set relora.reset_every=100
    compare cycle-150 relora --set relora.reset_every=150
    compare no-pair-moments relora --set relora.pair_moments=false
    compare rank-32 lora_warm,relora --set relora.rank=32 --set relora.alpha=64
    compare warm-150 lora_warm,relora --set relora.warm_start_steps=150
    compare warm-600 lora_warm,relora --set relora.warm_start_steps=600
    # The main table's hypothesis: the full-rank LR (2e-3) is too high at width 256, so every variant that trains
    # the linears full-rank ends worse than LoRA. Halve the full-rank LR, keep the low-rank phase at 2e-3.
    compare full-lr-0.5x full,lora_warm,relora --set schedule.lr=1e-3 --set schedule.low_rank_lr_scale=2
fi
