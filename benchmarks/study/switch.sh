#!/usr/bin/env bash
# The LR schedule at the warm-start switch (schedule.at_switch: restart against continue), measured at 20m with the
# study's base config (benchmarks/study/20m-sotu.yaml: 1 200 steps of 8 x 128 tokens, warm start 300, cycles of 300,
# r 16, peak LR 2e-3) on an in-distribution held-out split (heldout_split.py: every tenth training speech), three
# seeds. Per seed: `full` once (it does not switch); then lora_warm and relora under each mode, both starting from
# full's own step-300 checkpoint (relora.warm_start_checkpoint): the same weights, data position and step that an
# in-run switch has at step 300 (the warm start is the same full-rank run in every variant), without training the
# 300 warm-start steps four more times.
#
#   bash benchmarks/study/switch.sh              # resumable: rerun to continue; SEEDS="1 2 3" by default
#   python benchmarks/study/summarize_switch.py  # the table, into benchmarks/results/<date>-switch-20m/
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/study-switch}
BASE=benchmarks/study/20m-sotu.yaml
SEEDS=${SEEDS:-"1 2 3"}

"$PY" benchmarks/study/heldout_split.py "$OUT/data"
for seed in $SEEDS; do
    common=(--set "data.source=$OUT/data/train.jsonl" --set "data.validation_source=$OUT/data/heldout.jsonl"
            --set "train.seed=$seed" --set train.eval_every=300 --set train.eval_batches=100)
    "$PY" -m relora_ds compare --config "$BASE" --variants full --out "$OUT/full-seed$seed" "${common[@]}"
    warm="$OUT/full-seed$seed/full/checkpoints/step_00000300"
    for mode in restart continue; do
        "$PY" -m relora_ds compare --config "$BASE" --variants lora_warm,relora --out "$OUT/$mode-seed$seed" \
            "${common[@]}" --set "relora.warm_start_checkpoint=$warm" --set "schedule.at_switch=$mode"
    done
done
