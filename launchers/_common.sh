# Helpers shared by the launchers; sourced, never run. Each launcher sets PROG and defines usage().
#
# DRY_RUN=1 makes a launcher print the command it would run (one line, shell-quoted) and exit 0.
# DEEPSPEED / TORCHRUN name the binaries (default: `deepspeed` / `torchrun` on PATH).

DEFAULT_MASTER_PORT=29500
TRAIN_MODULE=relora_ds.train
LAUNCH_ENV=()   # VAR=value pairs set for the launched command (shown in the DRY_RUN line)
TRAIN_ARGS=()   # arguments passed through to relora_ds.train

die() {
    echo "$PROG: $*" >&2
    echo "Run '$PROG -h' for usage." >&2
    exit 2
}

# need_value OPTION "$@": the option's value must be present.
need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

# require_int NAME VALUE [MIN]: VALUE must be an integer >= MIN (default 0).
require_int() {
    local name=$1 value=$2 min=${3:-0}
    [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be an integer >= $min, got '$value'"
    (( value >= min )) || die "$name must be an integer >= $min, got '$value'"
}

# gpu_count: the GPUs this node can use. CUDA_VISIBLE_DEVICES wins when set (empty: none),
# else `nvidia-smi -L`, else 0.
gpu_count() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            echo 0
        else
            local -a ids
            IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
            echo "${#ids[@]}"
        fi
    elif command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# procs_per_node: the default number of processes per node: one per GPU, or 1 without GPUs.
procs_per_node() {
    local gpus
    gpus=$(gpu_count)
    echo $(( gpus > 0 ? gpus : 1 ))
}

# use_cpu_if_no_gpu: without GPUs, run DeepSpeed on its CPU accelerator (unless DS_ACCELERATOR is set).
use_cpu_if_no_gpu() {
    if [[ "$(gpu_count)" -eq 0 && -z "${DS_ACCELERATOR:-}" ]]; then
        LAUNCH_ENV+=("DS_ACCELERATOR=cpu")
    fi
}

# check_train_args: --config is given and exists; --deepspeed_config, when given, exists.
check_train_args() {
    local config="" ds_config="" i arg
    local -a args=("${TRAIN_ARGS[@]}")
    for (( i = 0; i < ${#args[@]}; i++ )); do
        arg=${args[i]}
        case "$arg" in
            --config) config=${args[i + 1]:-}; (( i += 1 )) ;;
            --config=*) config=${arg#--config=} ;;
            --deepspeed_config | --deepspeed-config) ds_config=${args[i + 1]:-}; (( i += 1 )) ;;
            --deepspeed_config=* | --deepspeed-config=*) ds_config=${arg#*=} ;;
        esac
    done
    [[ -n "$config" ]] || die "--config RUN.yaml is required"
    [[ -f "$config" ]] || die "--config: file not found: $config"
    if [[ -n "$ds_config" && ! -f "$ds_config" ]]; then
        die "--deepspeed_config: file not found: $ds_config"
    fi
}

# hostfile_hosts FILE: print the host names of a DeepSpeed hostfile (`name slots=N` per line, # comments),
# after checking its format and that no name repeats.
hostfile_hosts() {
    local file=$1 line name slots n=0
    [[ -f "$file" ]] || die "--hostfile: file not found: $file"
    local -A seen=()
    while IFS= read -r line || [[ -n "$line" ]]; do
        line=${line%%#*}
        [[ -z "${line//[[:space:]]/}" ]] && continue
        read -r name slots <<< "$line"
        [[ "$slots" =~ ^slots=[1-9][0-9]*$ ]] \
            || die "--hostfile $file: expected lines 'HOST slots=N', got '$line'"
        [[ -z "${seen[$name]:-}" ]] || die "--hostfile $file: host '$name' is listed twice"
        seen[$name]=1
        echo "$name"
        (( n += 1 ))
    done < "$file"
    (( n > 0 )) || die "--hostfile $file: no hosts listed"
}

# require_binary NAME PATH_OR_COMMAND: the launcher binary must exist (skipped for DRY_RUN=1).
require_binary() {
    [[ "${DRY_RUN:-0}" == 1 ]] && return 0
    command -v "$2" > /dev/null 2>&1 \
        || die "$1 not found: '$2' (activate the venv, e.g. 'source .venv/bin/activate', or set ${1^^}=PATH)"
}

# launch CMD...: print the command; with DRY_RUN=1 stop there, else run it and return its exit status.
#
# A scheduler signals every process of a job at once (SLURM: SIGTERM on preemption, SIGUSR1 before the time
# limit with sbatch --signal=USR1@600). The training processes then finish their step, save a checkpoint and exit
# with 75 (checkpoint.stop_signals); the launchers above them must outlive that. So CMD starts with SIGTERM,
# SIGUSR1 and SIGUSR2 ignored, which exec keeps: DeepSpeed's runner ignores them, while DeepSpeed's launch process,
# torchrun and srun set SIGTERM handlers of their own (pass it on to the ranks), and the training processes set
# theirs. The same signals, and SIGINT, sent to this shell alone (`kill PID`) are passed to CMD and every process
# under it (pass_on); this shell waits for CMD either way.
launch() {
    local line
    line=$(printf '%q ' "${LAUNCH_ENV[@]}" "$@")
    line=${line% }
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "$line"
        exit 0
    fi
    echo "$PROG: $line" >&2
    local kv
    for kv in "${LAUNCH_ENV[@]}"; do
        export "${kv?}"
    done
    ( trap '' TERM USR1 USR2; exec "$@" ) &
    LAUNCHED=$!
    local sig
    for sig in TERM INT USR1 USR2; do
        trap "pass_on $sig" "$sig"
    done
    # A trapped signal cuts `wait` short (status 128 + signal) without using up CMD's status: wait again. A wait
    # that did report CMD's status just before the trap ran makes the next one answer 127 (no such job): keep it.
    local status s first=1
    while true; do
        PASSED_ON=0
        s=0
        wait "$LAUNCHED" || s=$?
        if (( first || s != 127 )); then status=$s; fi
        first=0
        (( PASSED_ON )) || break
    done
    trap - TERM INT USR1 USR2
    return "$status"
}

# pass_on SIGNAL: send SIGNAL to the launched command and every process under it (a trap of launch). The ranks of
# torchrun run in sessions of their own, so a process group would not reach them.
pass_on() {
    PASSED_ON=1
    local pids
    pids=$(descendants "$LAUNCHED")
    # shellcheck disable=SC2086  # one pid per word
    kill -s "$1" "$LAUNCHED" $pids 2> /dev/null || true
}

# descendants PID: the pids of every process under PID, one per line.
descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        echo "$child"
        descendants "$child"
    done
}
