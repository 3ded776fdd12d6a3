#!/usr/bin/env bash
# Train on an IPU-POD with PopRun: N instances (host processes) sharing R replicas of a
# P-IPU pipeline. Replicas are split evenly over instances; each instance feeds its local
# replicas (vit-accel reads the split from popdist).
#
# Usage:
#   launch/poprun.sh [options] [-- extra vit-accel train arguments]
#     --config NAME           recipe (default vit-b16-ft)
#     --instances N           host processes (default 1; POD16: 1-4, POD64: up to 16)
#     --replicas R            total replicas (default: the recipe's ipu.replicas)
#     --ipus-per-replica P    IPUs per replica = pipeline stages (default: the recipe's)
#     --partition NAME        V-IPU partition ($IPUOF_VIPU_API_PARTITION_ID)
#     --vipu-host HOST        V-IPU server host ($IPUOF_VIPU_API_HOST)
#     --hosts h1,h2           hosts to run instances on (multi-host POD64)
#     --cache DIR             executable cache (default ./exe_cache); compiled once, reused
#     --dry-run               print the command instead of running it
#
# Examples:
#   # IPU-POD16, the mmcls recipe: 4 replicas x 4 IPUs, 1 instance
#   launch/poprun.sh --config vit-b16-ft --partition pod16 --vipu-host 10.1.2.3 \
#       -- --set data.train_shards=/data/in1k/train-{000000..001023}.tar --run-dir runs/b16
#   # IPU-POD64: 16 replicas over 4 instances (change the accumulation to keep the global batch)
#   launch/poprun.sh --instances 4 --replicas 16 --hosts h1,h2,h3,h4 --partition pod64 \
#       --vipu-host 10.1.2.3 -- --set ipu.gradient_accumulation=8
#
# Needs the Poplar SDK sourced (enable.sh) and PopTorch + popdist installed. Pass --run-dir:
# every instance must write to the same run directory (instance 0 writes checkpoints). With
# more than one instance they meet on MASTER_ADDR:MASTER_PORT (default: the first of --hosts,
# or this host, and 29500) in a gloo group for the host reductions (validation metrics, data
# positions); both are exported to every instance.
set -euo pipefail

CONFIG=vit-b16-ft INSTANCES=1 REPLICAS="" IPUS="" PARTITION="${IPUOF_VIPU_API_PARTITION_ID:-}"
VIPU_HOST="${IPUOF_VIPU_API_HOST:-}" HOSTS="" CACHE=./exe_cache DRY=0
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --instances) INSTANCES="$2"; shift 2 ;;
    --replicas) REPLICAS="$2"; shift 2 ;;
    --ipus-per-replica) IPUS="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --vipu-host) VIPU_HOST="$2"; shift 2 ;;
    --hosts) HOSTS="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "poprun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
# Defaults from the recipe itself, so the launcher and the recipe cannot disagree.
read -r R_REPLICAS R_IPUS < <("$PY" -c "
from vit_accel.config import load_recipe
r = load_recipe('$CONFIG'); print(r.ipu.replicas, r.ipu.ipus_per_replica)")
REPLICAS="${REPLICAS:-$R_REPLICAS}" IPUS="${IPUS:-$R_IPUS}"

if (( REPLICAS % INSTANCES )); then
  echo "poprun.sh: --replicas $REPLICAS is not divisible by --instances $INSTANCES" >&2; exit 2
fi
if [[ -z "$PARTITION" || -z "$VIPU_HOST" ]]; then
  echo "poprun.sh: give --partition and --vipu-host (or set IPUOF_VIPU_API_PARTITION_ID / IPUOF_VIPU_API_HOST)" >&2
  exit 2
fi

export MASTER_ADDR="${MASTER_ADDR:-${HOSTS%%,*}}" MASTER_PORT="${MASTER_PORT:-29500}"
MASTER_ADDR="${MASTER_ADDR:-$(hostname)}"
CMD=(poprun --vipu-server-host="$VIPU_HOST" --vipu-partition="$PARTITION"
     --num-instances="$INSTANCES" --num-replicas="$REPLICAS" --ipus-per-replica="$IPUS"
     --executable-cache-path="$CACHE" --only-output-from-instance=0
     --mpi-global-args="--tag-output"
     --mpi-local-args="-x PYTHONPATH -x PATH -x LD_LIBRARY_PATH -x MASTER_ADDR -x MASTER_PORT")
[[ -n "$HOSTS" ]] && CMD+=(--host "$HOSTS")
CMD+=("$PY" -m vit_accel train --backend ipu --config "$CONFIG"
      --set "ipu.replicas=$REPLICAS" --set "ipu.ipus_per_replica=$IPUS" --set "ipu.executable_cache=$CACHE" "$@")

if (( DRY )); then printf '%q ' "${CMD[@]}"; echo; else exec "${CMD[@]}"; fi
