#!/usr/bin/env bash
# Several machines, one process per machine. Run the same command on every host with its
# own rank; WORKDIR must be a path all hosts share (NFS, GCS via gcsfuse, ...).
#   COORDINATOR=host0:1234 NUM_HOSTS=4 HOST_RANK=0 ./launch/multi_host.sh CONFIG WORKDIR [...]
# Under SLURM, Open MPI or on a Cloud TPU pod, jax.distributed.initialize() finds these by
# itself and the three variables may be left unset. MODE picks train (default), sample,
# eval or probe (every process takes part; process 0 writes the results). PYTHON picks the
# interpreter (default: python).
# On CPUs (tests/test_multiprocess.py runs 2 processes on one machine this way), set
# JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo for collectives across processes.
set -euo pipefail
config=$1 workdir=$2; shift 2
cluster=()
if [[ -n "${COORDINATOR:-}" ]]; then
  cluster=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_HOSTS:?set NUM_HOSTS}"
           --process_id="${HOST_RANK:?set HOST_RANK}")
fi
exec "${PYTHON:-python}" -m atdiff_jax.main --config="$config" --workdir="$workdir" \
  --mode="${MODE:-train}" --config.training.multi_host=True "${cluster[@]}" "$@"
