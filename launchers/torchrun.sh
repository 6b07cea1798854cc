#!/usr/bin/env bash
# torchrun instead of the DeepSpeed launcher: run it on every node with its own --node_rank.
set -euo pipefail
PROG=$(basename "$0")
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --config RUN.yaml [--deepspeed_config DS.json] [options] [TRAIN ARGS...]

  torchrun --nnodes N --nproc_per_node G --node_rank R --master_addr A --master_port P \\
      -m $TRAIN_MODULE --config RUN.yaml ...

Options:
  --nnodes N           nodes; default: \$SLURM_NNODES when set, else 1
  --nproc_per_node G   processes on this node; default: the visible GPUs, or 1 without GPUs
  --node_rank R        this node's index; default: \$SLURM_NODEID when set, else 0
  --master_addr A      address of node 0; default 127.0.0.1 for one node, required for more
  --master_port P      rendezvous port; default $DEFAULT_MASTER_PORT
  -h, --help           this help

Every other argument goes to $TRAIN_MODULE (--config, --deepspeed_config, --set KEY=VALUE, --output_dir,
--resume). Without GPUs DS_ACCELERATOR=cpu is set. DRY_RUN=1 prints the command instead of running it;
TORCHRUN=PATH picks the binary.

Example (node 1 of 2, 8 GPUs each):
  $PROG --nnodes 2 --node_rank 1 --master_addr node0 --config RUN.yaml --deepspeed_config ds_configs/zero2.json
USAGE
}

nnodes=${SLURM_NNODES:-1}
nproc_per_node=""
node_rank=${SLURM_NODEID:-0}
master_addr=""
master_port=$DEFAULT_MASTER_PORT
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --nnodes) need_value "$@"; nnodes=$2; shift 2 ;;
        --nproc_per_node) need_value "$@"; nproc_per_node=$2; shift 2 ;;
        --node_rank) need_value "$@"; node_rank=$2; shift 2 ;;
        --master_addr) need_value "$@"; master_addr=$2; shift 2 ;;
        --master_port) need_value "$@"; master_port=$2; shift 2 ;;
        --) shift; TRAIN_ARGS+=("$@"); break ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done

nproc_per_node=${nproc_per_node:-$(procs_per_node)}
require_int --nnodes "$nnodes" 1
require_int --nproc_per_node "$nproc_per_node" 1
require_int --node_rank "$node_rank" 0
(( node_rank < nnodes )) || die "--node_rank must be below --nnodes ($nnodes), got $node_rank"
require_int --master_port "$master_port" 1
if [[ -z "$master_addr" ]]; then
    (( nnodes == 1 )) || die "--master_addr is required with --nnodes $nnodes (the address of node 0)"
    master_addr=127.0.0.1
fi
check_train_args
use_cpu_if_no_gpu

TORCHRUN=${TORCHRUN:-torchrun}
require_binary torchrun "$TORCHRUN"
launch "$TORCHRUN" --nnodes "$nnodes" --nproc_per_node "$nproc_per_node" --node_rank "$node_rank" \
    --master_addr "$master_addr" --master_port "$master_port" -m "$TRAIN_MODULE" "${TRAIN_ARGS[@]}"
