#!/usr/bin/env bash
# Run rlhfjax on GKE: render launch/gke_jobset.yaml for a TPU slice (default) or a GPU node pool,
# `kubectl apply` it, stream every pod's log here, delete the JobSet when the run ends.
#
#   launch/gke.sh [--dry-run] [--gpu] [--spot] [--keep] -- --config=NAME --workdir=/workdir/run [...]
#
# --dry-run prints the commands and the rendered manifest and runs nothing; --gpu targets GPU nodes;
# --spot asks for spot nodes; --keep leaves the JobSet (and its logs) in the cluster.
# Variables (environment; what each means is in launch/gke_jobset.yaml):
#   NAME (rlhfjax-$USER)  IMAGE (rlhfjax:latest)  NUM_HOSTS (2)  BUCKET (rlhfjax-$USER)
#   SERVICE_ACCOUNT (default)  TPU_ACCELERATOR (tpu-v5p-slice)  TPU_TOPOLOGY (2x2x2)
#   CHIPS_PER_HOST (4)  GPU_ACCELERATOR (nvidia-h100-80gb)  GPUS_PER_HOST (8)
set -euo pipefail

DRY=0 HW=tpu SPOT=0 KEEP=0
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --gpu) HW=gpu ;;
    --spot) SPOT=1 ;;
    --keep) KEEP=1 ;;
    *) echo "gke.sh: unknown option $1 (options go before --, rlhfjax.main's flags after)" >&2; exit 2 ;;
  esac
  shift
done
[[ ${1:-} == -- ]] && shift
[[ $# -gt 0 ]] || { echo "gke.sh: give rlhfjax.main's flags after --, e.g. -- --config=NAME --workdir=/workdir/run" >&2; exit 2; }

NAME=${NAME:-rlhfjax-${USER:-user}} IMAGE=${IMAGE:-rlhfjax:latest} NUM_HOSTS=${NUM_HOSTS:-2}
BUCKET=${BUCKET:-rlhfjax-${USER:-user}} SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-default}
TPU_ACCELERATOR=${TPU_ACCELERATOR:-tpu-v5p-slice} TPU_TOPOLOGY=${TPU_TOPOLOGY:-2x2x2}
CHIPS_PER_HOST=${CHIPS_PER_HOST:-4} GPU_ACCELERATOR=${GPU_ACCELERATOR:-nvidia-h100-80gb}
GPUS_PER_HOST=${GPUS_PER_HOST:-8}
MAIN_ARGS=""  # a YAML flow list: each flag as a JSON string
for a in "$@"; do a=${a//\\/\\\\}; MAIN_ARGS+="${MAIN_ARGS:+, }\"${a//\"/\\\"}\""; done
VARS=(NAME IMAGE NUM_HOSTS BUCKET SERVICE_ACCOUNT TPU_ACCELERATOR TPU_TOPOLOGY CHIPS_PER_HOST
      GPU_ACCELERATOR GPUS_PER_HOST MAIN_ARGS)

render() {  # the template without its header, ${VAR}s filled in, this hardware's tagged lines
  local line tag v
  while IFS= read -r line; do
    [[ $line == \#* ]] && continue
    tag=""
    if [[ $line =~ \ +#\ (tpu|gpu|spot)$ ]]; then tag=${BASH_REMATCH[1]}; line=${line%"${BASH_REMATCH[0]}"}; fi
    [[ -z $tag || $tag == "$HW" || ($tag == spot && $SPOT == 1) ]] || continue
    for v in "${VARS[@]}"; do line=${line//"\${$v}"/${!v}}; done
    echo "$line"
  done < "$(dirname "${BASH_SOURCE[0]}")/gke_jobset.yaml"
}

run() {  # print the command as it runs (args quoted where the shell needs it); run it unless --dry-run
  local a line="+"
  for a in "$@"; do [[ $a =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]] && line+=" $a" || line+=" ${a@Q}"; done
  echo "$line"
  [[ $DRY == 1 ]] || "$@"
}

MANIFEST=$(render)
PODS=(-l "jobset.sigs.k8s.io/jobset-name=$NAME")
if [[ $DRY == 1 ]]; then
  echo "+ kubectl apply -f - <<'EOF'"; echo "$MANIFEST"; echo "EOF"
else
  echo "+ kubectl apply -f -"; kubectl apply -f - <<< "$MANIFEST"
fi
[[ $KEEP == 1 || $DRY == 1 ]] || trap 'run kubectl delete jobset "$NAME" --ignore-not-found' EXIT
[[ $DRY == 1 ]] || until kubectl get pods "${PODS[@]}" -o name | grep -q .; do sleep 10; done
run kubectl wait --for=condition=Ready pod "${PODS[@]}" --timeout=60m
run kubectl logs -f "${PODS[@]}" --prefix --max-log-requests="$NUM_HOSTS"
[[ $KEEP == 1 || $DRY == 0 ]] || run kubectl delete jobset "$NAME" --ignore-not-found
