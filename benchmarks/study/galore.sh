#!/usr/bin/env bash
# GaLore beside the switch study's full, lora_warm and relora (benchmarks/results/2026-12-07-switch-20m/, the same base
# config, held-out split and seeds): `compare --variants galore` per seed (GaLore from step 0 over the 1 200 steps,
# the config's galore section: rank 64 = d/4, projection recomputed every 200 steps, scale 0.25, the study's peak LR),
# then each method's optimizer-state bytes (optimizer_state.py).
#
#   bash benchmarks/study/galore.sh              # resumable: rerun to continue; SEEDS="1 2 3" by default
#   python benchmarks/study/summarize_galore.py  # the table, into benchmarks/results/<date>-galore-20m/
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/study-galore}
BASE=benchmarks/study/20m-sotu.yaml
SEEDS=${SEEDS:-"1 2 3"}

"$PY" benchmarks/study/heldout_split.py "$OUT/data"
for seed in $SEEDS; do
    "$PY" -m relora_ds compare --config "$BASE" --variants galore --out "$OUT/galore-seed$seed" \
        --set "data.source=$OUT/data/train.jsonl" --set "data.validation_source=$OUT/data/heldout.jsonl" \
        --set "train.seed=$seed" --set train.eval_every=300 --set train.eval_batches=100
done
# Checks on seed 1: full-rank at the peak LR GaLore's projected matrices effectively get (2e-3 x scale 0.25) and at
# twice the study's LR, and full-rank at the study's LR trained again with this code (against the switch study's
# full-seed1).
for check in "full-lr5e-4:schedule.lr=5e-4" "full-lr4e-3:schedule.lr=4e-3" "full:schedule.lr=2e-3"; do
    "$PY" -m relora_ds compare --config "$BASE" --variants full --out "$OUT/${check%%:*}-seed1" \
        --set "data.source=$OUT/data/train.jsonl" --set "data.validation_source=$OUT/data/heldout.jsonl" \
        --set train.seed=1 --set train.eval_every=300 --set train.eval_batches=100 --set "${check#*:}"
done
"$PY" benchmarks/study/optimizer_state.py --config "$BASE" --data "$OUT/data" --out "$OUT/optimizer_state.json"
