#!/usr/bin/env bash
# Many nodes from one: the DeepSpeed launcher reaches every host of the hostfile over ssh (pdsh).
set -euo pipefail
PROG=$(basename "$0")
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LAUNCHERS="pdsh openmpi mvapich mpich impi slurm"

usage() {
    cat <<USAGE
Usage: $PROG --hostfile HOSTFILE --config RUN.yaml [--deepspeed_config DS.json] [options] [TRAIN ARGS...]

Run once, on the first host; DeepSpeed starts the processes on every host of HOSTFILE:
  deepspeed --hostfile H --launcher pdsh --master_addr A --master_port P --module $TRAIN_MODULE ...

HOSTFILE lists one host per line as 'HOST slots=GPUS' ('#' starts a comment). Needs passwordless ssh
to every host, pdsh installed, and the same paths (code, venv, data, configs) on every host.

Options:
  --hostfile FILE    required
  --master_addr A    address of the rank-0 host, reachable from all hosts; default: the first host
  --master_port P    rendezvous port; default $DEFAULT_MASTER_PORT
  --num_nodes N      use only the first N hosts; default: all
  --num_gpus G       processes per host; default: each host's slots
  --launcher L       multi-node backend: ${LAUNCHERS// /, }; default pdsh
  -h, --help         this help

Every other argument goes to $TRAIN_MODULE (--config, --deepspeed_config, --set KEY=VALUE, --output_dir,
--resume). Environment variables listed in ./.deepspeed_env (NAME=VALUE per line) are exported on every
host. DRY_RUN=1 prints the command instead of running it; DEEPSPEED=PATH picks the binary.

Example:
  $PROG --hostfile hosts.txt --config relora_ds/configs/1b.yaml --deepspeed_config ds_configs/zero3.json
USAGE
}

hostfile=""
master_addr=""
master_port=$DEFAULT_MASTER_PORT
num_nodes=""
num_gpus=""
launcher=pdsh
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
        --master_addr) need_value "$@"; master_addr=$2; shift 2 ;;
        --master_port) need_value "$@"; master_port=$2; shift 2 ;;
        --num_nodes) need_value "$@"; num_nodes=$2; shift 2 ;;
        --num_gpus) need_value "$@"; num_gpus=$2; shift 2 ;;
        --launcher) need_value "$@"; launcher=$2; shift 2 ;;
        --) shift; TRAIN_ARGS+=("$@"); break ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done

[[ -n "$hostfile" ]] || die "--hostfile HOSTFILE is required"
hosts_text=$(hostfile_hosts "$hostfile")
mapfile -t hosts <<< "$hosts_text"
[[ " $LAUNCHERS " == *" $launcher "* ]] || die "--launcher must be one of: ${LAUNCHERS// /, }; got '$launcher'"
require_int --master_port "$master_port" 1
if [[ -n "$num_nodes" ]]; then
    require_int --num_nodes "$num_nodes" 1
    (( num_nodes <= ${#hosts[@]} )) || die "--num_nodes $num_nodes: the hostfile lists only ${#hosts[@]} hosts"
fi
[[ -z "$num_gpus" ]] || require_int --num_gpus "$num_gpus" 1
master_addr=${master_addr:-${hosts[0]}}
check_train_args
use_cpu_if_no_gpu

cmd=(--hostfile "$hostfile" --launcher "$launcher" --master_addr "$master_addr" --master_port "$master_port")
[[ -z "$num_nodes" ]] || cmd+=(--num_nodes "$num_nodes")
[[ -z "$num_gpus" ]] || cmd+=(--num_gpus "$num_gpus")

DEEPSPEED=${DEEPSPEED:-deepspeed}
require_binary deepspeed "$DEEPSPEED"
launch "$DEEPSPEED" "${cmd[@]}" --module "$TRAIN_MODULE" "${TRAIN_ARGS[@]}"
