"""Sampler throughput at a fixed number of model evaluations (NFE), per sampler."""
from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from atdiff_jax import config as config_lib, parallel, samplers
from atdiff_jax.samplers import from_config
from atdiff_jax.bench import common
from atdiff_jax.models import create_model, init_params
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import num_params

DEFAULT_SAMPLERS = ('ancestral', 'ddim', 'dpm_solver++')


def random_params(config: ml_collections.ConfigDict, model, mesh: Mesh):
  """Freshly initialised params (the shape of the EMA params), replicated over the mesh."""

  def init(rng):
    return init_params(model, config, rng)

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))


def bench_sample(config: ml_collections.ConfigDict,
                 sampler_names: Sequence[str] = DEFAULT_SAMPLERS,
                 nfe: int = 10,
                 steps: int = 3,
                 warmup: int = 1,
                 repeats: int = 3,
                 mesh: Mesh | None = None,
                 log=None) -> dict[str, Any]:
  """Images per second of each sampler at `nfe` model evaluations per image.

  The batch is config.training.batch_size rounded up to the device count. Every sampler
  here makes one model call per step, so num_steps = nfe. Timing as in `bench_train`:
  compile and warm up each sampler, then `repeats` rounds over all of them, best round.
  Result: {'batch_size', 'nfe', 'num_params', 'steps', 'warmup', 'repeats', 'samplers':
  [name, compile_s, s_per_batch, round_s_per_batch, images_per_s, s_per_nfe, xla_memory,
  peak_memory]}.
  """
  mesh = make_mesh() if mesh is None else mesh
  config_lib.validate_model(config)
  for name in sampler_names:
    samplers.get_sampler(name)  # unknown names fail before anything compiles
  if nfe > config.diffusion.num_timesteps:
    raise ValueError(f'nfe={nfe} exceeds the {config.diffusion.num_timesteps} diffusion steps')
  batch = common.round_to_devices(config.training.batch_size, mesh.size)
  model = create_model(config)
  params = random_params(config, model, mesh)
  rng = jax.random.key(config.seed)
  rows, starts = [], []
  for name in sampler_names:
    if log:
      log(f'sample: compiling {name}')
    generate = from_config.make_generate_fn(config, mesh, batch, name, nfe, model)
    # Jitting the wrapper gives one executable whose compile time can be read off.
    compiled, compile_s = common.time_compile(jax.jit(generate), params, rng)
    call = functools.partial(compiled, params, rng)  # same work for any key
    warm_start = time.perf_counter()
    common.warm_up(call, warmup)
    if log:
      log(f'sample: {name}: compiled in {compile_s:.1f} s, warm-up '
          f'{time.perf_counter() - warm_start:.1f} s')
    starts.append(lambda call=call: call)
    rows.append({'name': name, 'compile_s': compile_s,
                 'xla_memory': common.compiled_memory(compiled),
                 'peak_memory': common.peak_memory()})
  if log:
    log(f'sample: timing {len(rows)} samplers, {repeats} rounds of {steps} calls')
  for row, times in zip(rows, common.round_robin(starts, steps, repeats)):
    s_per_batch = min(times)
    row.update({'s_per_batch': s_per_batch, 'round_s_per_batch': times,
                'images_per_s': batch / s_per_batch, 's_per_nfe': s_per_batch / nfe})
  return {
      'batch_size': batch,
      'nfe': nfe,
      'num_params': num_params(params),
      'steps': steps,
      'warmup': warmup,
      'repeats': repeats,
      'samplers': rows,
  }
