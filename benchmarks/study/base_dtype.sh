#!/usr/bin/env bash
# What a stored W costs in held-out loss: the switch study's relora (benchmarks/study/20m-sotu.yaml, the in-distribution
# held-out split) with the frozen W kept as the run computes (fp32 on CPU), and as int8 re-quantized at every merge
# with round-to-nearest and with stochastic rounding (relora.base_dtype, relora.merge_rounding; docs/memory.md).
#
#   bash benchmarks/study/base_dtype.sh          # SEEDS="1" by default; resumable per run
#   grep -h '"eval"' runs/study-base-dtype/*/relora/metrics.jsonl | tail   # the held-out evals
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/study-base-dtype}
BASE=benchmarks/study/20m-sotu.yaml
SEEDS=${SEEDS:-"1"}

"$PY" benchmarks/study/heldout_split.py "$OUT/data"
for seed in $SEEDS; do
    for variant in "auto:relora.base_dtype=auto" "int8-nearest:relora.base_dtype=int8" \
                   "int8-stochastic:relora.base_dtype=int8 relora.merge_rounding=stochastic"; do
        sets=()
        for kv in ${variant#*:}; do sets+=(--set "$kv"); done
        "$PY" -m relora_ds compare --config "$BASE" --variants relora --out "$OUT/${variant%%:*}-seed$seed" \
            --set "data.source=$OUT/data/train.jsonl" --set "data.validation_source=$OUT/data/heldout.jsonl" \
            --set "train.seed=$seed" --set train.eval_every=300 --set train.eval_batches=100 "${sets[@]}"
    done
done
