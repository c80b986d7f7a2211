#!/usr/bin/env bash
# Run rlhfjax on a Cloud TPU VM slice: create it (or a queued resource), copy this checkout to every
# worker and install it, run `python -m rlhfjax.main` on all workers at once (each one process;
# jax.distributed finds the others itself), stream the logs here, delete the slice.
#
#   launch/tpu_vm.sh [--dry-run] [--spot] [--queued] [--keep] -- --config=NAME --workdir=DIR [--config.a.b=v ...]
#
# Options: --dry-run prints the exact commands and runs none; --spot asks for spot capacity;
# --queued creates a queued resource (waits for capacity) instead of a VM; --keep leaves the slice up.
# Variables (environment):
#   TPU_NAME          slice name                                 (rlhfjax-$USER)
#   ZONE              zone with that accelerator                 (us-central2-b)
#   ACCELERATOR_TYPE  slice type, its size sets the worker count (v4-16: 2 workers of 4 chips)
#   RUNTIME_VERSION   TPU VM image                               (tpu-ubuntu2204-base)
#   PROJECT           GCP project                                (gcloud's default)
#   BUCKET            GCS bucket mounted at /mnt/$BUCKET on every worker with gcsfuse (none): a
#                     multi-worker --workdir must be a directory all workers share, e.g. /mnt/$BUCKET/run
#   LOG               where the streamed logs are also written   (tpu_vm_$TPU_NAME.log)
set -euo pipefail

DRY=0 SPOT=() QUEUED=0 KEEP=0
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --spot) SPOT=(--spot) ;;
    --queued) QUEUED=1 ;;
    --keep) KEEP=1 ;;
    *) echo "tpu_vm.sh: unknown option $1 (options go before --, rlhfjax.main's flags after)" >&2; exit 2 ;;
  esac
  shift
done
[[ ${1:-} == -- ]] && shift
[[ $# -gt 0 ]] || { echo "tpu_vm.sh: give rlhfjax.main's flags after --, e.g. -- --config=NAME --workdir=DIR" >&2; exit 2; }

TPU_NAME=${TPU_NAME:-rlhfjax-${USER:-user}}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
LOG=${LOG:-tpu_vm_${TPU_NAME}.log}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD=(gcloud compute tpus)
WHERE=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

run() {  # print the command as it runs (args quoted where the shell needs it); run it unless --dry-run
  local a line="+"
  for a in "$@"; do [[ $a =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]] && line+=" $a" || line+=" ${a@Q}"; done
  echo "$line"
  [[ $DRY == 1 ]] || "$@"
}

if [[ $QUEUED == 1 ]]; then
  run "${GCLOUD[@]}" queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${SPOT[@]}"
  [[ $DRY == 1 ]] || until "${GCLOUD[@]}" queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
    --format='value(state.state)' | grep -qx ACTIVE; do sleep 30; done
  DELETE=("${GCLOUD[@]}" queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet)
else
  run "${GCLOUD[@]}" tpu-vm create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${SPOT[@]}"
  DELETE=("${GCLOUD[@]}" tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet)
fi
[[ $KEEP == 1 || $DRY == 1 ]] || trap 'run "${DELETE[@]}"' EXIT  # deleted however the run ends

# this working tree to every worker, then install it there
SRC=${TMPDIR:-/tmp}/rlhfjax-$TPU_NAME.tgz
run tar -czf "$SRC" -C "$ROOT" --exclude=.venv --exclude=.git --exclude='__pycache__' .
run "${GCLOUD[@]}" tpu-vm scp "$SRC" "$TPU_NAME:rlhfjax.tgz" "${WHERE[@]}" --worker=all
MOUNT=""  # gcsfuse from Google's apt repository, the bucket at /mnt/$BUCKET
[[ -z ${BUCKET:-} ]] || MOUNT="echo 'deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main' \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo apt-key add - && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse \
&& sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET && gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET && "
run "${GCLOUD[@]}" tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
  --command="${MOUNT}mkdir -p rlhfjax && tar -xzf rlhfjax.tgz -C rlhfjax && pip install -q -e './rlhfjax[tpu]'"

# every worker runs the same command; the logs of all of them stream here (and into $LOG)
RUN=("${GCLOUD[@]}" tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all
     --command="cd rlhfjax &&$(printf ' %q' python -m rlhfjax.main "$@")")
if [[ $DRY == 1 ]]; then run "${RUN[@]}"; else run "${RUN[@]}" 2>&1 | tee "$LOG"; fi
[[ $KEEP == 1 || $DRY == 0 ]] || run "${DELETE[@]}"
