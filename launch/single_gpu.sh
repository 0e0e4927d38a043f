#!/usr/bin/env bash
# One GPU (or CPU): ./launch/single_gpu.sh configs/cifar10_adm.py WORKDIR [--config.x=y ...]
# On a fast GPU add --config.training.minibatches_per_call=4 (or more): the host then hands
# the train state over once per 4 minibatches (docs/training.md, docs/benchmark.md).
set -euo pipefail
config=$1 workdir=$2; shift 2
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
# Let XLA take what it needs instead of pre-allocating 75% of the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m atdiff_jax.main --config="$config" --workdir="$workdir" --mode=train "$@"
