#!/usr/bin/env bash
# One node, N processes: deepspeed --num_gpus N --module relora_ds.train ...
set -euo pipefail
PROG=$(basename "$0")
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --config RUN.yaml [--deepspeed_config DS.json] [options] [TRAIN ARGS...]

Train on this node with the DeepSpeed launcher:
  deepspeed --num_gpus N --master_port P --module $TRAIN_MODULE --config RUN.yaml ...

Options:
  --num_gpus N       processes (one per GPU); default: the visible GPUs, or 1 without GPUs
                     (CPU ranks then: DS_ACCELERATOR=cpu is set; --num_gpus 2 gives 2 CPU ranks)
  --master_port P    rendezvous port; default $DEFAULT_MASTER_PORT
  -h, --help         this help

Every other argument goes to $TRAIN_MODULE: --config, --deepspeed_config, --set KEY=VALUE (repeatable),
--output_dir DIR, --resume. Use -- to pass the rest verbatim.

Environment: DRY_RUN=1 prints the command instead of running it; DEEPSPEED=PATH picks the binary.

Example:
  $PROG --num_gpus 8 --config relora_ds/configs/1b.yaml --deepspeed_config ds_configs/zero2.json \\
      --set train.output_dir=runs/1b
USAGE
}

num_gpus=""
master_port=$DEFAULT_MASTER_PORT
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --num_gpus) need_value "$@"; num_gpus=$2; shift 2 ;;
        --master_port) need_value "$@"; master_port=$2; shift 2 ;;
        --) shift; TRAIN_ARGS+=("$@"); break ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done

num_gpus=${num_gpus:-$(procs_per_node)}
require_int --num_gpus "$num_gpus" 1
require_int --master_port "$master_port" 1
check_train_args
use_cpu_if_no_gpu

DEEPSPEED=${DEEPSPEED:-deepspeed}
require_binary deepspeed "$DEEPSPEED"
launch "$DEEPSPEED" --num_gpus "$num_gpus" --master_port "$master_port" \
    --module "$TRAIN_MODULE" "${TRAIN_ARGS[@]}"
