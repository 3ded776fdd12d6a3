#!/usr/bin/env bash
# Launch `vit-accel COMMAND ...` with torchrun: one process per GPU (or CPU process), one node or many.
#
# Usage:
#   launch/torchrun.sh [--nnodes N] [--node-rank R] [--nproc-per-node P] [--max-restarts K]
#                      [--master-addr HOST] [--master-port PORT] [--] COMMAND [ARGS...]
#
#   Every option can come from the environment instead: NNODES (default 1), NODE_RANK (0),
#   NPROC_PER_NODE (GPUs listed by nvidia-smi, else 1), MAX_RESTARTS (3), MASTER_ADDR
#   (127.0.0.1), MASTER_PORT (29500), PYTHON (python), SHUTDOWN_TIMEOUT (300). Flags win.
#
# A process that dies (a killed rank, a lost GPU) makes torchrun stop the group and start it
# again, up to MAX_RESTARTS times; `train` resumes by itself from the newest complete checkpoint
# when given --resume auto (and a --run-dir). SIGTERM or SIGUSR1 to this script reach every
# process (torchrun forwards them), which checkpoint the step in flight and exit 75; torchrun
# then ends without a restart, waiting up to SHUTDOWN_TIMEOUT seconds for the checkpoint.
#
# One node, 8 GPUs, ZeRO-2:
#   launch/torchrun.sh train --backend gpu --config vit-b16-ft --set distributed.zero_stage=2 \
#       --run-dir runs/ft --resume auto
# Two CPU processes (gloo), the embedded digits recipe under ZeRO-3:
#   NPROC_PER_NODE=2 launch/torchrun.sh train --backend cpu --config vit-ti-digits --set distributed.zero_stage=3
# Two nodes: run on each node, node0 reachable from node1 on MASTER_PORT:
#   node0$ launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr node0 train --backend gpu --config vit-b16-ft
#   node1$ launch/torchrun.sh --nnodes 2 --node-rank 1 --master-addr node0 train --backend gpu --config vit-b16-ft
#   (the run directory must be on a filesystem both nodes see: rank 0 writes the consolidated
#   checkpoint, every rank writes its DeepSpeed shard beside it)
set -euo pipefail

gpus() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [[ "$n" -ge 1 ]]; then echo "$n"; else echo 1; fi
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --nproc-per-node) NPROC_PER_NODE=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --master-addr) MASTER_ADDR=$2; shift 2 ;;
    --master-port) MASTER_PORT=$2; shift 2 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "launch/torchrun.sh: give the vit-accel command, e.g. 'train --backend gpu --config vit-b16-ft' (--help)" >&2
  exit 2
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus)}
[[ "$NPROC_PER_NODE" -ge 1 ]] 2>/dev/null || NPROC_PER_NODE=1

# A torchrun that knows --shutdown-timeout (torch 2.14 does) forwards the signals it is told to and
# waits as long as it is told to; older ones forward SIGTERM only (SIGUSR1 would end torchrun) and
# wait 30 s before SIGKILL (a checkpoint cut short leaves the previous one the newest).
signals=()
torch_dir=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])")
if grep -q -- shutdown-timeout "$torch_dir/distributed/run.py"; then
  signals=(--signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT")
fi

set -x
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --max_restarts "$MAX_RESTARTS" ${signals[@]+"${signals[@]}"} \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m vit_accel "$@"
