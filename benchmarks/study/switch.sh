#!/usr/bin/env bash
# The LR schedule at the warm-start switch (schedule.at_switch: restart against continue), measured at 20m with the
# study's base config (benchmarks/study/20m-sotu.yaml: 1 200 steps of 8 x 128 tokens, warm start 300, cycles of 300,
# r 16, peak LR 2e-3) on an in-distribution held-out split (heldout_split.py: every tenth training speech), three
# seeds. `full` does not switch, so it runs once per seed; lora_warm and relora run under both modes.
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
    "$PY" -m relora_ds compare --config "$BASE" --variants full,lora_warm,relora --out "$OUT/restart-seed$seed" \
        "${common[@]}" --set schedule.at_switch=restart
    "$PY" -m relora_ds compare --config "$BASE" --variants lora_warm,relora --out "$OUT/continue-seed$seed" \
        "${common[@]}" --set schedule.at_switch=continue
done
