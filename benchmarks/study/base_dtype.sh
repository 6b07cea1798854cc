#!/usr/bin/env bash
# What the frozen W's storage costs in held-out loss (relora.base_dtype, relora.merge_rounding; docs/memory.md): the
# study's ReLoRA (benchmarks/study/20m-sotu.yaml, on the in-distribution held-out split of heldout_split.py) with five
# merges (800 steps: warm start 200, then a merge every 100 steps, at 300 ... 700), schedule.at_switch restart, and
# three seeds per W:
#   fp32             base_dtype auto (the CPU run computes in fp32: W takes every update exactly; the twin)
#   bf16-nearest     bf16 W, round-to-nearest (a bf16 run's W today)
#   bf16-stochastic  bf16 W, stochastic rounding
#   int8-nearest     int8 W (one scale per row), round-to-nearest
#   int8-stochastic  int8 W, stochastic rounding
#   fp8-stochastic   fp8 (e4m3) W (one scale per row), stochastic rounding
# Compute is fp32 in every run, so only W's storage differs. relora.track_drift logs each merge's drift from the
# exact sum of the merges, and every restart record its rounding error and share kept.
#
#   bash benchmarks/study/base_dtype.sh                 # resumable: rerun to continue; SEEDS=1,2,3 by default
#   python benchmarks/study/summarize_base_dtype.py     # the table, into benchmarks/results/<date>-base-dtype-20m/
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/study-wdtype}
BASE=benchmarks/study/20m-sotu.yaml
SEEDS=${SEEDS:-1,2,3}

"$PY" benchmarks/study/heldout_split.py "$OUT/data"
for variant in "fp32:relora.base_dtype=auto" \
               "bf16-nearest:relora.base_dtype=bf16" \
               "bf16-stochastic:relora.base_dtype=bf16 relora.merge_rounding=stochastic" \
               "int8-nearest:relora.base_dtype=int8" \
               "int8-stochastic:relora.base_dtype=int8 relora.merge_rounding=stochastic" \
               "fp8-stochastic:relora.base_dtype=fp8 relora.merge_rounding=stochastic"; do
    sets=()
    for kv in ${variant#*:}; do sets+=(--set "$kv"); done
    "$PY" -m relora_ds compare --config "$BASE" --variants relora --seeds "$SEEDS" --out "$OUT/${variant%%:*}" \
        --set "data.source=$OUT/data/train.jsonl" --set "data.validation_source=$OUT/data/heldout.jsonl" \
        --set train.total_steps=800 --set relora.warm_start_steps=200 --set relora.reset_every=100 \
        --set schedule.at_switch=restart --set train.eval_every=200 --set train.eval_batches=100 \
        --set checkpoint.every=400 --set relora.track_drift=true "${sets[@]}"
done
