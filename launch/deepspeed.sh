#!/usr/bin/env bash
# Launch `vit-accel COMMAND ...` with DeepSpeed's launcher (ssh/pdsh to every host of a hostfile).
#
# Usage:
#   launch/deepspeed.sh [--hostfile FILE] [--num-gpus N] [--master-addr HOST] [--master-port PORT]
#                       [--] COMMAND [ARGS...]
#
#   HOSTFILE (default: launch/hostfile if it exists, else this node only), NUM_GPUS (this node
#   only: all GPUs), MASTER_ADDR (first host of the hostfile), MASTER_PORT (29500), DEEPSPEED
#   (deepspeed). The launcher passes --local_rank=N to each process; vit-accel accepts it.
#   The recipe still chooses the ZeRO stage: --set distributed.zero_stage=0..3 (the launcher
#   only starts processes; -1 would train with plain DDP).
#
# This node, all GPUs:
#   launch/deepspeed.sh train --backend gpu --config vit-b16-ft --set distributed.zero_stage=3
# Two nodes from a hostfile (see launch/hostfile.example), started once, on node0:
#   launch/deepspeed.sh --hostfile launch/hostfile --master-addr node0 \
#       train --backend gpu --config vit-b16-ft --set distributed.zero_stage=2
# Needs: passwordless ssh from node0 to every host, pdsh, the same Python environment and the
# repository at the same path on every host, and a shared run directory.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
HOSTFILE=${HOSTFILE:-}
[[ -z "$HOSTFILE" && -f "$HERE/hostfile" ]] && HOSTFILE="$HERE/hostfile"
NUM_GPUS=${NUM_GPUS:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-deepspeed}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --num-gpus) NUM_GPUS=$2; shift 2 ;;
    --master-addr) MASTER_ADDR=$2; shift 2 ;;
    --master-port) MASTER_PORT=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "launch/deepspeed.sh: give the vit-accel command, e.g. 'train --backend gpu --config vit-b16-ft' (--help)" >&2
  exit 2
fi
if ! command -v "$DEEPSPEED" >/dev/null 2>&1; then
  echo "launch/deepspeed.sh: '$DEEPSPEED' not found: pip install deepspeed (or use launch/torchrun.sh)" >&2
  exit 2
fi

args=(--master_port "$MASTER_PORT")
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "launch/deepspeed.sh: no hostfile $HOSTFILE" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE")
  if [[ -z "$MASTER_ADDR" ]]; then
    MASTER_ADDR=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
  fi
fi
[[ -n "$MASTER_ADDR" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "$NUM_GPUS" ]] && args+=(--num_gpus "$NUM_GPUS")

set -x
exec "$DEEPSPEED" "${args[@]}" --module vit_accel "$@"
