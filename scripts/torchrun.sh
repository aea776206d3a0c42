#!/usr/bin/env bash
# Run `dltrain fit` on NNODES machines x NPROC_PER_NODE processes (one per GPU).
#
#   scripts/torchrun.sh NNODES NPROC_PER_NODE RDZV_HOST:PORT [dltrain fit args...]
#
# Start the same command on every node. RDZV_HOST must be one of the nodes (it
# hosts torchrun's c10d rendezvous store on PORT); node ranks are assigned by the
# rendezvous, global rank 0 makes the run directory, so put run.dir (or the
# current folder) on a file system that every node sees. On GPUs pass
# trainer.accelerator=gpu: NCCL is then chosen automatically.
#
# Environment:
#   DLTRAIN       the dltrain executable (default: dltrain on PATH)
#   TORCHRUN      the torchrun executable (default: the one beside $DLTRAIN, else PATH)
#   RDZV_ID       rendezvous id, the same on every node (default: $SLURM_JOB_ID or dltrain)
#   RDZV_TIMEOUT  seconds to wait for all nodes to join (default: 900)
#   TORCHRUN_ARGS more torchrun options, split on spaces (e.g. --max-restarts=0)
#
# Signals: the script becomes torchrun (exec), so SIGTERM or SIGINT sent to it
# reaches torchrun, which forwards it to its workers; dltrain stops at the next
# step and marks the run "interrupted" in manifest.json.
set -euo pipefail

prog=$(basename "$0")

usage_error() {
    echo "$prog: $1" >&2
    echo "usage: $prog NNODES NPROC_PER_NODE RDZV_HOST:PORT [dltrain fit args...]" >&2
    echo "  e.g. $prog 2 4 node01:29500 trainer.accelerator=gpu strategy=ddp" >&2
    exit 2
}

if [[ $# -lt 3 ]]; then
    usage_error "expected NNODES NPROC_PER_NODE RDZV_HOST:PORT, got $# argument(s)"
fi
nnodes=$1
nproc=$2
endpoint=$3
shift 3

[[ $nnodes =~ ^[1-9][0-9]*$ ]] ||
    usage_error "NNODES must be a positive integer, got '$nnodes'"
[[ $nproc =~ ^[1-9][0-9]*$ ]] ||
    usage_error "NPROC_PER_NODE must be a positive integer, got '$nproc'"
if [[ ! $endpoint =~ ^(.+):([0-9]{1,5})$ ]] || ((10#${BASH_REMATCH[2]} < 1 || 10#${BASH_REMATCH[2]} > 65535)); then
    usage_error "RDZV_HOST:PORT must be a host and a port (1-65535), e.g. node01:29500; got '$endpoint'"
fi
rdzv_timeout=${RDZV_TIMEOUT:-900}
[[ $rdzv_timeout =~ ^[1-9][0-9]*$ ]] ||
    usage_error "RDZV_TIMEOUT must be a positive number of seconds, got '$rdzv_timeout'"

dltrain=$(command -v "${DLTRAIN:-dltrain}") ||
    usage_error "dltrain executable '${DLTRAIN:-dltrain}' not found; activate its venv or set DLTRAIN"
[[ $dltrain == /* ]] || dltrain=$PWD/$dltrain
if [[ -n ${TORCHRUN:-} ]]; then
    torchrun=$(command -v "$TORCHRUN") ||
        usage_error "torchrun executable '$TORCHRUN' not found; set TORCHRUN"
elif [[ -x $(dirname "$dltrain")/torchrun ]]; then
    torchrun=$(dirname "$dltrain")/torchrun # same venv, same python as dltrain
else
    torchrun=$(command -v torchrun) ||
        usage_error "torchrun not found beside $dltrain nor on PATH; set TORCHRUN"
fi

read -ra extra <<<"${TORCHRUN_ARGS:-}"

# torchrun runs the dltrain console script with its own python (the venv's).
exec "$torchrun" \
    --nnodes="$nnodes" \
    --nproc-per-node="$nproc" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$endpoint" \
    --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-dltrain}}" \
    --rdzv-conf="join_timeout=$rdzv_timeout" \
    ${extra[@]+"${extra[@]}"} \
    "$dltrain" fit "$@"
