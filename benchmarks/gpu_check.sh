#!/usr/bin/env bash
# `make gpu-check`: every GPU check of relora-ds in one command, on one CUDA GPU (H100/H200), in at most
# 9 minutes (GPU_CHECK_DEADLINE=540 s), each step under its own `timeout`:
#
#   benchmarks/gpu_check.sh              # run it (refuses with one line when CUDA is absent)
#   benchmarks/gpu_check.sh --dry-run    # print the steps, their timeouts and commands; needs no GPU
#   GPU_CHECK_DRY_RUN=1 make gpu-check   # the same through make
#
# Steps (timeouts in seconds; they add up to 520, within the 540 s deadline):
#   install      35  wheels from .whl/ into .site/ (pip --no-index --no-deps --target, torch pinned by a
#                    constraints file and never reinstalled); PYTHONPATH=.site:. for every later step
#   env          15  env.json: GPU name, driver, memory (nvidia-smi), torch/CUDA/triton/transformers/
#                    deepspeed/datasets versions, python, git commit, date, the planned steps
#   pytest-gpu  120  python -m pytest -q -m gpu (the gpu-marked tests)
#   kernels      45  benchmarks/kernel_bench.py --models 1.3b --ranks 128 --tokens 8192 (3 projection shapes)
#   ds-build     75  JIT-builds DeepSpeed's FusedAdam once, so the benchmarks do not pay for it
#   bench-zero0 110  relora-ds bench --preset 1b --seq-len 2048 --micro-batch 4 on ds_configs/zero0.json
#   bench-zero3 120  the same on ds_configs/zero3.json
# A step never runs past the deadline: its timeout is cut to the time left, and a step with under 10 s left
# (or whose prerequisite failed) is skipped. Everything goes to benchmarks/results/<date>-gpu-check/
# (GPU_CHECK_RESULTS): env.json, one log per step (NN-<step>.log), the kernels and bench results
# (.md/.json/.png), summary.md and summary.tsv. The exit status is 1 if any step failed, timed out or was
# skipped, 2 without CUDA.
#
# The GPU machine needs python3 with PyTorch (CUDA), Triton and transformers; DeepSpeed, datasets and their
# small dependencies come as wheels in .whl/, built on a machine with network access (a CUDA machine with
# Python 3.12: `pip download --no-deps --only-binary=:all: --python-version 3.12` of datasets and DeepSpeed's
# and datasets' small dependencies, and `pip wheel --no-deps deepspeed==0.19.8`, into .whl/). Without .whl/ the install
# step passes only when deepspeed and datasets are importable already. It never creates .venv and never
# installs torch.
#
# Settings (environment): PYTHON (python3), GPU_CHECK_RESULTS, GPU_CHECK_DEADLINE (540), GPU_CHECK_SEQ
# (2048), GPU_CHECK_MICRO_BATCH (4), GPU_CHECK_WARMUP (3), GPU_CHECK_STEPS (10), GPU_CHECK_REPEATS (1),
# GIT_COMMIT (recorded when the tree has no .git, e.g. a copied working tree).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHON=${PYTHON:-python3}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[ "$DRY_RUN" = "0" ] && DRY_RUN=""

# --- env.json (runs as its own step: `gpu_check.sh --env-json FILE`) ------------------------------------------
write_env_json() {
    "$PYTHON" - "$1" <<'PY'
import datetime, importlib.metadata as md, json, os, platform, subprocess, sys

def run(*cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

gpus = []
smi = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader")
for line in (smi or "").splitlines():
    parts = [x.strip() for x in line.split(",")]
    parts += [None] * (4 - len(parts))
    gpus.append(dict(zip(("name", "driver", "memory", "compute_capability"), parts)))
import torch
cuda = torch.cuda.is_available()
commit = run("git", "rev-parse", "HEAD")
status = run("git", "status", "--porcelain", "--untracked-files=no")
env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "git_commit": commit or os.environ.get("GIT_COMMIT") or "unknown (no git repository here; set GIT_COMMIT)",
    "git_dirty": None if status is None else bool(status),
    "hostname": platform.node(),
    "nvidia_smi": gpus,
    "driver": gpus[0]["driver"] if gpus else None,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_count": torch.cuda.device_count() if cuda else 0,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    "cuda_available": cuda,
    "torch_cuda": torch.version.cuda,
    "python": platform.python_version(),
    "python_executable": sys.executable,
    "versions": {name: version(name) for name in
                 ("torch", "triton", "transformers", "deepspeed", "datasets", "tokenizers", "safetensors",
                  "pydantic", "numpy", "pytest", "flash-attn")},
    "torch_file": torch.__file__,
    "pythonpath": os.environ.get("PYTHONPATH"),
    "gpu_check": json.loads(os.environ.get("GPU_CHECK_PLAN", "null")),
}
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=2)
print(json.dumps({k: env[k] for k in ("date", "git_commit", "gpu", "driver", "versions")}, indent=2))
PY
}

case "${1:-}" in
    --env-json) write_env_json "$2"; exit $? ;;
    --dry-run|-n) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --help)" >&2; exit 2 ;;
esac

START=$(date +%s.%N)   # the deadline counts from here, the CUDA check included
DEADLINE=${GPU_CHECK_DEADLINE:-540}
KILL_AFTER=5      # SIGKILL this long after the SIGTERM of a step's timeout
MIN_STEP=${GPU_CHECK_MIN_STEP:-10}   # a step with less time than this left is skipped
SEQ=${GPU_CHECK_SEQ:-2048}
MICRO_BATCH=${GPU_CHECK_MICRO_BATCH:-4}
WARMUP=${GPU_CHECK_WARMUP:-3}
STEPS=${GPU_CHECK_STEPS:-10}
REPEATS=${GPU_CHECK_REPEATS:-1}
if [ -n "${GPU_CHECK_RESULTS:-}" ]; then
    RESULTS=$GPU_CHECK_RESULTS
else
    RESULTS=benchmarks/results/$(date -u +%F)-gpu-check
    # a second check on the same day gets its own folder
    [ -z "$DRY_RUN" ] && [ -e "$RESULTS" ] && RESULTS=$RESULTS-$(date -u +%H%M%S)
fi

py=$(printf %q "$PYTHON")
res=$(printf %q "$RESULTS")
# --- the steps: name, timeout (s), prerequisites, command (run as `timeout -k 5 T bash -c COMMAND`) ----------
NAMES=() BUDGETS=() NEEDS=() CMDS=()
step() { NAMES+=("$1"); BUDGETS+=("$2"); NEEDS+=("$3"); CMDS+=("$4"); }

step install 35 "" "set -e
if ! ls .whl/*.whl >/dev/null 2>&1; then
  if $py -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec(\"deepspeed\") and u.find_spec(\"datasets\") else 1)'; then
    echo 'no wheels in .whl/; deepspeed and datasets are importable already: nothing to install'; exit 0
  fi
  echo 'no wheels in .whl/ and deepspeed/datasets are not importable: build .whl/ on a machine with network access (benchmarks/README.md, GPU check)'; exit 1
fi
$py -c 'import torch; print(\"torch==\" + torch.__version__.split(\"+\")[0])' > $res/constraints.txt
$py -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site -c $res/constraints.txt .whl/*.whl
test ! -e .site/torch
$py -c 'import torch, deepspeed, datasets; print(\"torch\", torch.__version__, torch.__file__); print(\"deepspeed\", deepspeed.__version__, \"datasets\", datasets.__version__)'"
step env 15 "" "bash benchmarks/gpu_check.sh --env-json $res/env.json && test -s $res/env.json"
step pytest-gpu 120 "install" "$py -m pytest -q -m gpu -rfEs"
step kernels 45 "" "$py benchmarks/kernel_bench.py --models 1.3b --ranks 128 --tokens 8192 --out $res && ls $res/kernels_*.json"
step ds-build 75 "install" "$py -c 'from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(verbose=True); print(\"FusedAdam loaded\")'"
for stage in 0 3; do
    step bench-zero$stage $((stage == 0 ? 110 : 120)) "install ds-build" \
        "$py -m relora_ds bench --preset 1b --seq-len $SEQ --micro-batch $MICRO_BATCH --ds-config ds_configs/zero$stage.json --warmup $WARMUP --steps $STEPS --repeats $REPEATS --results-dir $res --tag zero$stage"
done

TOTAL=0
for b in "${BUDGETS[@]}"; do TOTAL=$((TOTAL + b)); done
PLAN_JSON="{\"deadline_s\": $DEADLINE, \"step_timeouts_s\": {"
for i in "${!NAMES[@]}"; do PLAN_JSON+="$([ "$i" -gt 0 ] && echo ", ")\"${NAMES[$i]}\": ${BUDGETS[$i]}"; done
PLAN_JSON+="}, \"seq_len\": $SEQ, \"micro_batch\": $MICRO_BATCH, \"warmup\": $WARMUP, \"steps\": $STEPS, \"repeats\": $REPEATS}"

if [ -n "$DRY_RUN" ]; then
    echo "gpu-check dry run: ${#NAMES[@]} steps, $TOTAL s of step timeouts (deadline $DEADLINE s); results would go to $RESULTS/"
    echo "each step runs as: timeout -k $KILL_AFTER <timeout> bash -c <command>, in $ROOT, PYTHONPATH=$ROOT/.site:$ROOT"
    for i in "${!NAMES[@]}"; do
        echo "step ${NAMES[$i]} (timeout ${BUDGETS[$i]} s): ${CMDS[$i]//$'\n'/$'\n'    }"
    done
    exit 0
fi

if ! timeout 30 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' </dev/null >/dev/null 2>&1; then
    echo "gpu-check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is not True); nothing run (--dry-run lists the steps)" >&2
    exit 2
fi

mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT/.site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_CHECK_PLAN="$PLAN_JSON"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
elapsed() { awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }

declare -A STATUS
SECS=() TOUTS=() RCS=() LOGS=()
echo "gpu-check: ${#NAMES[@]} steps, $TOTAL s of step timeouts, deadline $DEADLINE s; results in $RESULTS/"
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]}
    log=$RESULTS/$(printf %02d $((i + 1)))-$name.log
    LOGS+=("$log") SECS+=("0") RCS+=("-")
    missing=""
    for dep in ${NEEDS[$i]}; do [ "${STATUS[$dep]:-}" = passed ] || missing+=" $dep"; done
    left=$(awk -v d="$DEADLINE" -v e="$(elapsed)" -v k="$KILL_AFTER" 'BEGIN { printf "%d", d - e - k }')
    t=$(( BUDGETS[i] < left ? BUDGETS[i] : left ))
    TOUTS+=("$t")
    if [ -n "$missing" ]; then
        STATUS[$name]="skipped (needs$missing)"
    elif [ "$t" -lt "$MIN_STEP" ]; then
        STATUS[$name]="skipped (deadline)"
    fi
    if [ -n "${STATUS[$name]:-}" ]; then
        TOUTS[i]="-" SECS[i]="-"
        echo "== [$((i + 1))/${#NAMES[@]}] $name: ${STATUS[$name]}" | tee "$log"
        continue
    fi
    echo "== [$((i + 1))/${#NAMES[@]}] $name (timeout $t s, at $(elapsed) s): ${CMDS[$i]//$'\n'/$'\n'    }"
    { echo "# step $name, timeout $t s, $(date -u +%FT%TZ)"; sed 's/^/# /' <<<"${CMDS[$i]}"; } >"$log"
    began=$(date +%s.%N)
    timeout -k "$KILL_AFTER" "$t" bash -c "${CMDS[$i]}" </dev/null >>"$log" 2>&1
    rc=$?
    SECS[$i]=$(awk -v s="$began" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
    RCS[$i]=$rc
    case $rc in
        0) STATUS[$name]=passed ;;
        124|137) STATUS[$name]="timed out"; [ "$t" -lt "${BUDGETS[$i]}" ] && STATUS[$name]+=" (deadline)" ;;
        *) STATUS[$name]="failed (exit $rc)" ;;
    esac
    echo "   ${STATUS[$name]} in ${SECS[$i]} s; log $log"
    if [ "$rc" -eq 0 ]; then tail -n 3 "$log" | sed 's/^/   | /'; else tail -n 25 "$log" | sed 's/^/   | /'; fi
done

failed=0
{
    echo "# GPU check $(date -u +%FT%TZ)"
    echo
    echo "Deadline $DEADLINE s, step timeouts $TOTAL s, total $(elapsed) s. Environment: env.json."
    echo
    echo "| step | status | seconds | timeout (s) | exit | log |"
    echo "|---|---|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATUS[${NAMES[$i]}]} | ${SECS[$i]} | ${TOUTS[$i]} | ${RCS[$i]} | $(basename "${LOGS[$i]}") |"
    done
} >"$RESULTS/summary.md"
printf 'step\tstatus\tseconds\ttimeout_s\texit\tlog\n' >"$RESULTS/summary.tsv"
for i in "${!NAMES[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${STATUS[${NAMES[$i]}]}" "${SECS[$i]}" "${TOUTS[$i]}" \
        "${RCS[$i]}" "$(basename "${LOGS[$i]}")" >>"$RESULTS/summary.tsv"
    [ "${STATUS[${NAMES[$i]}]}" = passed ] || failed=1
done
echo
sed -n '5,$p' "$RESULTS/summary.md"
echo
echo "gpu-check: $([ $failed -eq 0 ] && echo "all steps passed" || echo "FAILED"); results in $RESULTS/"
exit $failed
