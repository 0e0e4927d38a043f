#!/usr/bin/env bash
# A Cloud TPU pod slice: launch/multi_host.sh on every worker at once, over gcloud ssh;
# jax.distributed.initialize() discovers the pod by itself. WORKDIR should be a gs://
# bucket (Orbax writes there) or a path every worker shares.
#   TPU_NAME=my-pod ZONE=us-central2-b ./launch/tpu_pod.sh CONFIG gs://bucket/run [...]
# REMOTE_DIR: this repository's checkout on the workers (default ~/atdiff_jax); MODE as in
# multi_host.sh; GCLOUD: the gcloud command (default gcloud).
set -euo pipefail
config=$1 workdir=$2; shift 2
# Quoted once here, for the workers' shell: overrides with spaces or parentheses survive.
args=$(printf ' %q' "$config" "$workdir" "$@")
remote="cd ${REMOTE_DIR:-~/atdiff_jax} && MODE=${MODE:-train} PYTHON=${REMOTE_PYTHON:-python3} \
./launch/multi_host.sh${args}"
exec ${GCLOUD:-gcloud} compute tpus tpu-vm ssh "${TPU_NAME:?set TPU_NAME}" \
  --zone="${ZONE:?set ZONE}" --worker=all --command="$remote"
