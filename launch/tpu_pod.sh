#!/usr/bin/env bash
# A Cloud TPU pod slice: runs the same command on every worker. jax.distributed.initialize()
# discovers the pod by itself. WORKDIR should be a gs:// bucket (Orbax writes there).
#   TPU_NAME=my-pod ZONE=us-central2-b ./launch/tpu_pod.sh CONFIG gs://bucket/run [...]
set -euo pipefail
config=$1 workdir=$2; shift 2
gcloud compute tpus tpu-vm ssh "${TPU_NAME:?set TPU_NAME}" --zone="${ZONE:?set ZONE}" \
  --worker=all --command="cd ~/atdiff_jax && python3 -m atdiff_jax.main \
  --config=$config --workdir=$workdir --mode=train --config.training.multi_host=True $*"
