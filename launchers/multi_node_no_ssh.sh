#!/usr/bin/env bash
# One launcher per node, no ssh: run this on every node with its own --node_rank.
set -euo pipefail
PROG=$(basename "$0")
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --hostfile HOSTFILE --node_rank R --config RUN.yaml [--deepspeed_config DS.json] [options]
       [TRAIN ARGS...]

Start this node's share of a multi-node run without ssh; run it on every node (node ranks 0..N-1):
  deepspeed --hostfile H --no_ssh --node_rank R --master_addr A --master_port P --module $TRAIN_MODULE ...

HOSTFILE lists one host per line as 'HOST slots=PROCESSES' ('#' starts a comment); its order defines the
node ranks and every node must see the same file. Names must be distinct, but need not resolve: two
"nodes" on one machine work with --master_addr 127.0.0.1 (hostfile 'node0 slots=1' / 'node1 slots=1').

Options:
  --hostfile FILE    required
  --node_rank R      this node's index in HOSTFILE; default: \$SLURM_NODEID when set, else required
  --master_addr A    address of node 0, reachable from every node; default: the first host
  --master_port P    rendezvous port; default $DEFAULT_MASTER_PORT
  -h, --help         this help

Every other argument goes to $TRAIN_MODULE (--config, --deepspeed_config, --set KEY=VALUE, --output_dir,
--resume). Without GPUs DS_ACCELERATOR=cpu is set. DRY_RUN=1 prints the command instead of running it;
DEEPSPEED=PATH picks the binary.

Example (two "nodes" on this machine, one CPU rank each; start both):
  $PROG --hostfile hosts.txt --node_rank 0 --master_addr 127.0.0.1 --config RUN.yaml &
  $PROG --hostfile hosts.txt --node_rank 1 --master_addr 127.0.0.1 --config RUN.yaml
USAGE
}

hostfile=""
node_rank=${SLURM_NODEID:-}
master_addr=""
master_port=$DEFAULT_MASTER_PORT
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
        --node_rank) need_value "$@"; node_rank=$2; shift 2 ;;
        --master_addr) need_value "$@"; master_addr=$2; shift 2 ;;
        --master_port) need_value "$@"; master_port=$2; shift 2 ;;
        --) shift; TRAIN_ARGS+=("$@"); break ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done

[[ -n "$hostfile" ]] || die "--hostfile HOSTFILE is required"
hosts_text=$(hostfile_hosts "$hostfile")
mapfile -t hosts <<< "$hosts_text"
[[ -n "$node_rank" ]] || die "--node_rank R is required (0 on the first node of the hostfile)"
require_int --node_rank "$node_rank" 0
(( node_rank < ${#hosts[@]} )) \
    || die "--node_rank must be below the number of hosts in $hostfile (${#hosts[@]}), got $node_rank"
require_int --master_port "$master_port" 1
master_addr=${master_addr:-${hosts[0]}}
check_train_args
use_cpu_if_no_gpu

DEEPSPEED=${DEEPSPEED:-deepspeed}
require_binary deepspeed "$DEEPSPEED"
launch "$DEEPSPEED" --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master_addr" \
    --master_port "$master_port" --module "$TRAIN_MODULE" "${TRAIN_ARGS[@]}"
