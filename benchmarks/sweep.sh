#!/usr/bin/env bash
# Throughput sweep on one GPU: model presets × ReLoRA ranks, one benchmarks/throughput.py run each.
#
#   benchmarks/sweep.sh                                   # 60m … 1b and 7b, r ∈ {64, 128, 256}, seq 2048
#   PRESETS="1b" RANKS="128" SEQ=512 MICRO_BATCH=16 benchmarks/sweep.sh --repeats 3
#   benchmarks/sweep.sh --max-microbatch                  # also each mode's largest micro batch
#   DRY_RUN=1 benchmarks/sweep.sh                         # print the commands only
#
# Settings come from the environment: PRESETS, RANKS, SEQ, MICRO_BATCH, DS_CONFIG, PYTHON; extra arguments
# go to every throughput.py run. A mode that runs out of memory (7b full-rank with ZeRO-0/1 on one 80 GB
# GPU) is recorded as OOM in that run's results, the other modes are still measured: "7b where memory
# allows". A run that fails otherwise is reported and the sweep goes on; the exit status is 1 if any failed.
# Results: benchmarks/results/<date>-<gpu>-<preset>-r<rank>-s<seq>-mb<micro batch>.{json,md,png}.
set -uo pipefail

cd "$(dirname "$0")/.."
PRESETS=${PRESETS:-"60m 130m 250m 350m 1b 7b"}
RANKS=${RANKS:-"64 128 256"}
SEQ=${SEQ:-2048}
MICRO_BATCH=${MICRO_BATCH:-4}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

if [ -z "${DRY_RUN:-}" ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "sweep.sh: no CUDA GPU; on CPU run benchmarks/throughput.py on the tiny and 20m presets instead" >&2
    exit 2
fi

failed=()
for preset in $PRESETS; do
    for rank in $RANKS; do
        cmd=("$PYTHON" benchmarks/throughput.py --preset "$preset" --rank "$rank" --seq-len "$SEQ"
             --micro-batch "$MICRO_BATCH" --ds-config "$DS_CONFIG" --tag "r${rank}-s${SEQ}-mb${MICRO_BATCH}" "$@")
        echo "+ ${cmd[*]}"
        [ -n "${DRY_RUN:-}" ] && continue
        if ! "${cmd[@]}"; then
            echo "sweep.sh: $preset r=$rank failed" >&2
            failed+=("$preset/r$rank")
        fi
    done
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "sweep.sh: failed runs: ${failed[*]}" >&2
    exit 1
fi
