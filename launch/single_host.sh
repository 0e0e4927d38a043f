#!/usr/bin/env bash
# All accelerators of one machine, one process: the mesh axis 'data' spans every local
# device and config.training.batch_size is the global batch, split over them.
#   ./launch/single_host.sh configs/cifar10_adm.py WORKDIR [--config.x=y ...]
set -euo pipefail
config=$1 workdir=$2; shift 2
exec python -m atdiff_jax.main --config="$config" --workdir="$workdir" --mode=train "$@"
