#!/usr/bin/env bash
# The performance check of one accelerator (GPU or TPU), in under 8 minutes:
#   ./launch/device_check.sh [--inception_weights=inception_fid.msgpack] [--peak_tflops=N]
# prints one markdown report: the header, then each table as soon as it is measured.
#  1. configs/cifar10_adm.py at global batch 128 in bfloat16: the train step for none and
#     free AT K=3 (the backend's default replay loop) and free K=3 with the other loop:
#     compile s, ms / update, images / s, MFU, XLA and peak device memory;
#  2. the FID pipeline: 10k DPM-Solver++ NFE-10 samples + Inception features + FID;
#  3. if time remains: pgd K=3, fgsm, and remat=blocks.
# Each step gets the time that is left (BUDGET_S, default 450 s, in all); a step cut short
# says so, and the tables above it stand. CONFIG, BATCH, DTYPE and PYTHON override defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
config=(--config="${CONFIG:-configs/cifar10_adm.py}"
        --config.training.batch_size="${BATCH:-128}" --config.model.dtype="${DTYPE:-bfloat16}")
deadline=$((SECONDS + ${BUDGET_S:-450}))
case "$("$python" -c 'import jax; print(jax.default_backend())' 2>/dev/null)" in
  cpu) other_loop=rolled ;;  # the auto loop unrolls on CPU
  *) other_loop=unrolled ;;
esac

step() {  # step NAME ARGS...: one bench run within the time left
  local name=$1 left=$((deadline - SECONDS)); shift
  if (( left < 20 )); then
    echo; echo "_${name}: not run, the time budget is spent._"; return
  fi
  timeout -s TERM -k 5 "$left" "$python" -m atdiff_jax.bench "${config[@]}" "$@"
  local rc=$?
  if (( rc == 124 || rc == 137 )); then
    echo; echo "_${name}: cut short after ${left} s; the tables above are complete._"
  elif (( rc != 0 )); then
    echo; echo "_${name}: failed (exit ${rc}); see the messages above._"
  fi
}

step 'train' --what=train --variants="none,free:3,free:3@${other_loop}" \
  --steps="${STEPS:-10}" --warmup=2 --repeats=2 "$@"
step 'FID pipeline' --noheader --what=fid --fid_samples="${FID_SAMPLES:-10000}" --nfe=10 \
  --inception_batch="${FID_BATCH:-1000}" "$@"
step 'more variants' --noheader --what=train --variants=none,pgd:3,fgsm,none@remat=blocks,free:3@remat=blocks \
  --steps="${STEPS:-10}" --warmup=1 --repeats=1 "$@"
