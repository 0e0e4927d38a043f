"""What every benchmark part shares: timing compiled calls, memory readings, the environment."""
from __future__ import annotations

import math
import platform
import resource
import sys
import time
from typing import Any, Callable, Sequence

import flax
import jax
import ml_collections

from atdiff_jax import config as config_lib


def round_to_devices(n: int, num_devices: int) -> int:
  """`n` rounded up to a multiple of `num_devices` (at least one per device)."""
  return max(1, math.ceil(n / num_devices)) * num_devices


def time_compile(jitted, *args) -> tuple[Any, float]:
  """(compiled executable, seconds spent lowering and compiling it for `args`)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def warm_up(call: Callable[[], Any], n: int) -> None:
  """`n` untimed calls, each waited for."""
  for _ in range(n):
    jax.block_until_ready(call())


def seconds_per_call(call: Callable[[], Any], steps: int) -> float:
  """Wall seconds per call over `steps` calls dispatched back to back.

  Waiting once at the end measures the throughput a training or sampling loop sees
  (dispatch overlaps device work).
  """
  start = time.perf_counter()
  outputs = [call() for _ in range(steps)]
  jax.block_until_ready(outputs)
  return (time.perf_counter() - start) / steps


def round_robin(starts: Sequence[Callable[[], Callable[[], Any]]], steps: int,
                repeats: int) -> list[list[float]]:
  """Seconds per call of each entry in each of `repeats` rounds: times[entry][round].

  `starts[j]()` sets entry j up (e.g. puts a fresh train state on the device) and returns
  its call. Rounds visit every entry in turn, so a change in the machine's load during
  the measurement touches all entries alike instead of skewing their ratios, and the
  best round of each entry is the least disturbed one.
  """
  if steps < 1 or repeats < 1:
    raise ValueError(f'need steps >= 1 and repeats >= 1, got steps={steps}, repeats={repeats}')
  times: list[list[float]] = [[] for _ in starts]
  for _ in range(repeats):
    for entry, start in zip(times, starts):
      entry.append(seconds_per_call(start(), steps))
  return times


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's own accounting of one device's buffers for a compiled program, when it has one.

  `footprint_bytes` = arguments + outputs - donated (aliased) + temporaries: what this
  program needs on a device, independent of anything else the process holds.
  """
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if stats is None:
    return None
  out = {
      'argument_bytes': int(stats.argument_size_in_bytes),
      'output_bytes': int(stats.output_size_in_bytes),
      'alias_bytes': int(stats.alias_size_in_bytes),
      'temp_bytes': int(stats.temp_size_in_bytes),
  }
  out['footprint_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                            + out['temp_bytes'])
  return out


def compiled_flops(compiled) -> float | None:
  """XLA's count of one device's floating-point operations in a compiled program, when the
  backend has a cost analysis (a while loop's body is counted once)."""
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


# Dense peak FLOP/s per device for the compute dtype, from the vendors' data sheets (bf16
# with tensor cores / MXU; float32 on GPUs: without TF32). Longest matching prefix wins.
_PEAK_FLOPS = {
    'bfloat16': {'NVIDIA H200': 989e12, 'NVIDIA H100': 989e12, 'NVIDIA A100': 312e12,
                 'NVIDIA L4': 121e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
                 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
                 'TPU v6 lite': 918e12, 'TPU v6e': 918e12},
    'float32': {'NVIDIA H200': 67e12, 'NVIDIA H100': 67e12, 'NVIDIA A100': 19.5e12},
}


def peak_flops(device, dtype: str, override_tflops: float = 0.0) -> float | None:
  """The device's peak FLOP/s for `dtype` (None when unknown, e.g. CPUs); `override_tflops`
  > 0 replaces the table (a device it does not list, or another definition of peak)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  table = _PEAK_FLOPS.get(str(dtype), {})
  kind = getattr(device, 'device_kind', '')
  matches = [k for k in table if kind.startswith(k)]
  return table[max(matches, key=len)] if matches else None


def peak_memory() -> dict[str, Any]:
  """The process's peak memory so far (a running maximum: it never goes down).

  Accelerators: the largest `peak_bytes_in_use` over the local devices. CPU has no device
  allocator statistics, so the process's peak resident set size is reported instead.
  """
  peaks = []
  for device in jax.local_devices():
    stats = device.memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  if peaks:
    return {'kind': 'device_peak', 'bytes': max(peaks)}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports kilobytes, macOS bytes.
  return {'kind': 'host_peak_rss', 'bytes': int(rss if sys.platform == 'darwin' else rss * 1024)}


def environment(config: ml_collections.ConfigDict, config_name: str = '') -> dict[str, Any]:
  """Backend, devices, versions and the config's shape: the header of every report."""
  devices = jax.devices()
  batch = int(config.training.batch_size)
  return {
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'process_count': jax.process_count(),
      'jax_version': jax.__version__,
      'flax_version': flax.__version__,
      'python_version': platform.python_version(),
      'config': config_name,
      'batch_size': batch,
      'per_device_batch': batch / len(devices),
      'image_shape': list(config_lib.image_shape(config)),
      'model_dtype': str(config.model.dtype),
  }
