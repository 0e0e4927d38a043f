"""The eval block of a config (`config.eval`): its sampler options, the config a sampling or
evaluation command runs with, and its checks, made before anything loads or compiles.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from atdiff_jax import checkpoint, samplers
from atdiff_jax import config as config_lib
from atdiff_jax.diffusion import betas_of
from atdiff_jax.models import inception
from atdiff_jax.samplers import options as sampler_options_lib
from atdiff_jax.views import view_of


def options_of(eval_config: ml_collections.ConfigDict, sampler: str) -> dict[str, Any]:
  """`config.eval.sampler_options` for `sampler` ('dpm_solver++' -> 'dpm_solver_pp')."""
  key = sampler.replace('++', '_pp')
  options = eval_config.get('sampler_options') or {}
  block = options.get(key) if hasattr(options, 'get') else None
  if block is None:
    return {}
  return dict(block.to_dict() if hasattr(block, 'to_dict') else block)


def resolve_config(workdir: str, override: ml_collections.ConfigDict | None = None
                   ) -> ml_collections.ConfigDict:
  """The config for sampling or evaluating the run in `workdir`.

  The run's `config.json` always gives the model, the diffusion and the training block
  (the checkpoint's shape). With `override` (the `--config` of the command line, usually
  the run's own config file plus `--config.eval.*` flags), its `eval`, `data` and `probe`
  blocks and `model.dtype` are used instead; it must describe the same model, or this
  raises ConfigError. Without it, the blocks stored in `config.json` are used as they are.
  """
  config = checkpoint.load_config(workdir)
  if override is None:
    if 'eval' not in config:
      raise config_lib.ConfigError(
          f'{os.path.join(workdir, checkpoint.CONFIG_FILE)} has no eval block; pass '
          '--config=<the config file the run was trained with> (and --config.eval.* flags)')
    return config
  # Dropout only acts in training: a config that differs in it samples the same network.
  differ = [f'{field}={config_lib.field_value(override, field)!r} '
            f'(the run: {config_lib.field_value(config, field)!r})'
            for field in config_lib.network_differences(config, override, ignore=('dropout',))]
  if differ:
    raise config_lib.ConfigError(
        f'--config describes another model than the run in {workdir}: '
        f'{", ".join(differ[:4])}{", ..." if len(differ) > 4 else ""}; pass the config file '
        'the run was trained with')
  config.eval = ml_collections.ConfigDict(override.eval.to_dict())
  config.data = ml_collections.ConfigDict(override.data.to_dict())
  if 'probe' in override:
    config.probe = ml_collections.ConfigDict(override.probe.to_dict())
  config.model.dtype = override.model.dtype
  return config


def _fail(field: str, value: Any, why: str) -> None:
  config_lib.fail(f'eval.{field}', value, why)


def _check_sampler(field: str, name: Any, ev: ml_collections.ConfigDict) -> None:
  """A known sampler, and options (config.eval.sampler_options) it can use."""
  if name not in samplers.SAMPLERS:
    _fail(field, name, f'must be one of {", ".join(samplers.SAMPLERS)}')
  sampler_options_lib.check_config_options(ev)


def _check_nfe(field: str, nfe: Any, num_timesteps: int) -> None:
  if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= num_timesteps:
    _fail(field, nfe, f'must be an integer in 1..{num_timesteps} (diffusion.num_timesteps)')


def _check_eps_scale(field: str, value: Any) -> None:
  config_lib.check_number(f'eval.{field}', value)  # 1 = no epsilon scaling


def _check_consistency_times(config: ml_collections.ConfigDict, nfes: tuple[int, ...]) -> None:
  """Given consistency timesteps must fit every NFE asked for (one time per step) and lie
  above the run's t_min (f is the identity there); without them, a given sigma_max must lie
  above t_min's noise level (the default times run from one to the other)."""
  num_timesteps = config.diffusion.num_timesteps
  given = options_of(config.eval, 'consistency')
  t_min = view_of(config).sampler_defaults('consistency').get('t_min', 0.0)
  times = tuple(given.get('timesteps') or ())
  if not times:
    if given.get('sigma_max') is not None:
      abar = np.cumprod(1.0 - betas_of(config))[int(t_min)]
      sigma_min = float(np.sqrt((1.0 - abar) / abar))
      if not given['sigma_max'] > sigma_min:
        _fail('sampler_options.consistency.sigma_max', given['sigma_max'],
              f'must be above sigma~ = {sigma_min:.4g} of the run\'s t_min = {t_min:g}')
    return
  field = 'sampler_options.consistency.timesteps'
  if any(nfe != len(times) for nfe in nfes):
    _fail(field, times, f'gives {len(times)} times, one per step, but NFE {nfes} is asked '
          'for; leave it empty for the default times at every NFE')
  if not (all(t_min < t <= num_timesteps - 1 for t in times)
          and all(a > b for a, b in zip(times, times[1:]))):
    _fail(field, times, f'must decrease strictly within ({t_min:g}, {num_timesteps - 1}] '
          '(original-scale timesteps above the run\'s consistency.t_min)')


def validate_eval(config: ml_collections.ConfigDict, mode: str, num_devices: int) -> None:
  """Checks `config.eval` for `mode` ('sample' or 'eval') before anything compiles."""
  if 'eval' not in config:
    raise config_lib.ConfigError('config.eval is missing')
  config_lib.validate_model(config)
  ev = config.eval
  num_timesteps = config.diffusion.num_timesteps
  for field in ('batch_size', 'num_samples'):
    value = ev[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      _fail(field, value, 'must be a positive integer')
  if ev.batch_size % num_devices:
    _fail('batch_size', ev.batch_size, f'must be divisible by the number of devices '
          f'({num_devices})')
  if not isinstance(ev.step, int) or ev.step < -1:
    _fail('step', ev.step, 'must be a checkpoint step, or -1 for the latest')
  num_ema = len(config.training.ema_rates)
  if ev.use_ema and not 0 <= ev.ema_index < num_ema:
    _fail('ema_index', ev.ema_index, f'the run keeps {num_ema} EMA trees '
          f'(training.ema_rates={tuple(config.training.ema_rates)})')
  if mode == 'sample':
    _check_sampler('sampler', ev.sampler, ev)
    _check_nfe('nfe', ev.nfe, num_timesteps)
    _check_eps_scale('eps_scale', ev.eps_scale)
    if ev.sampler == 'consistency':
      _check_consistency_times(config, (ev.nfe,))
    return
  if ev.num_samples < 2:
    _fail('num_samples', ev.num_samples, 'must be >= 2 to estimate a covariance')
  for field in ('samplers', 'nfes', 'eps_scales'):
    if not tuple(ev[field]):
      _fail(field, ev[field], 'must not be empty')
  for name in ev.samplers:
    _check_sampler('samplers', name, ev)
  for nfe in ev.nfes:
    _check_nfe('nfes', nfe, num_timesteps)
  for value in ev.eps_scales:
    _check_eps_scale('eps_scales', value)
  if 'consistency' in ev.samplers:
    _check_consistency_times(config, tuple(ev.nfes))
  if ev.inception_weights and not os.path.isfile(ev.inception_weights):
    try:  # raises at once for a missing file, with the steps to make one
      inception.load_inception_weights(ev.inception_weights)
    except FileNotFoundError as e:
      raise config_lib.ConfigError(f'config.eval.inception_weights: {e}') from None
  if ev.ref_stats and not ev.inception_weights:
    _fail('ref_stats', ev.ref_stats, 'FID reference statistics need '
          'config.eval.inception_weights (the network they were computed with)')
  if ev.ref_stats and not os.path.isfile(ev.ref_stats):
    _fail('ref_stats', ev.ref_stats, 'no such file (leave it empty to compute the reference '
          'statistics from config.data)')
