"""The eval block of a config (`config.eval`): its sampler options, the config a sampling or
evaluation command runs with, and its checks, made before anything loads or compiles.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from atdiff_jax import checkpoint
from atdiff_jax import config as config_lib
from atdiff_jax.diffusion import betas_of
from atdiff_jax.models import inception
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


def _check_nfe(field: str, nfe: Any, num_timesteps: int) -> None:
  if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= num_timesteps:
    _fail(field, nfe, f'must be an integer in 1..{num_timesteps} (diffusion.num_timesteps)')


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
  config_lib.validate_eval_choices(config)  # samplers, their options, epsilon scales
  ev = config.eval
  config_lib.check_seed('eval.seed', ev.seed)
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
    _check_nfe('nfe', ev.nfe, num_timesteps)
    if ev.sampler == 'consistency':
      _check_consistency_times(config, (ev.nfe,))
    return
  if ev.num_samples < 2:
    _fail('num_samples', ev.num_samples, 'must be >= 2 to estimate a covariance')
  for field in ('samplers', 'nfes', 'eps_scales'):
    if not tuple(ev[field]):
      _fail(field, ev[field], 'must not be empty')
  for nfe in ev.nfes:
    _check_nfe('nfes', nfe, num_timesteps)
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


# Files found readable in this process, by (path, size, mtime): an experiment opens many
# runs with the same weights.
_READABLE: set[tuple] = set()


def _check_readable(field: str, path: str, read: Callable[[str], Any]) -> None:
  """`read(path)` works: a garbled file is one line now, not a traceback after sampling."""
  key = None
  if os.path.isfile(path):
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
  if key in _READABLE:
    return
  try:
    read(path)
  except Exception as e:  # the user's file: whatever it raises, name it
    _fail(field, path, f'cannot be read: {" ".join(str(e).split())}')
  _READABLE.add(key)


def _check_reference(path: str) -> None:
  from atdiff_jax.metrics.fid import load_stats  # pylint: disable=g-import-not-at-top
  stats = load_stats(path)
  dim = stats.mu.shape[0] if stats.mu.ndim == 1 else None
  if dim is None or stats.sigma.shape != (dim, dim):
    raise ValueError(f'mu {stats.mu.shape} and sigma {stats.sigma.shape} are not a mean and '
                     'its covariance')
  if not (np.all(np.isfinite(stats.mu)) and np.all(np.isfinite(stats.sigma))):
    raise ValueError('mu or sigma holds non-finite values')


def _json_object(path: str, key: str | None = None) -> None:
  """ValueError unless `path` holds a JSON object (with a list under `key`)."""
  with open(path) as f:
    value = json.load(f)
  if not isinstance(value, dict):
    raise ValueError('not a JSON object')
  if key is not None and not isinstance(value.get(key), list):
    raise ValueError(f'no list of {key}')


def _check_out_dir(what: str, path: str, resume_file: str | None = None,
                   key: str | None = None) -> None:
  """`path` is, or can become, a folder, and the file through which a restart resumes there
  (if any) reads: one line now, not after the checkpoint is loaded or the first cell ran."""
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f'{what}: cannot be a folder: {parent} is a file')
  resume = os.path.join(path, resume_file or '')
  if resume_file and os.path.exists(resume):
    try:
      _json_object(resume, key)
    except (OSError, ValueError) as e:
      raise config_lib.ConfigError(
          f'{what}: {resume} cannot be read ({" ".join(str(e).split())}); move it away (the '
          'results there are kept) or choose another folder') from None


def check_files(workdir: str, config: ml_collections.ConfigDict, mode: str) -> None:
  """What `mode` reads and writes besides the checkpoint: weights and reference files
  that parse, an output folder that can be one, and a resume file that reads."""
  # pylint: disable=g-import-not-at-top
  from atdiff_jax.evaluation import probe, report, sweep
  from atdiff_jax.evaluation.generate import META_FILE, default_out_dir
  ev = config.eval
  if mode == 'sample':
    out_dir = ev.out_dir or default_out_dir(workdir, ev.sampler, ev.nfe, ev.eps_scale)
    what = f'config.eval.out_dir={ev.out_dir!r}' if ev.out_dir else out_dir
    _check_out_dir(what, out_dir, META_FILE)
    return
  if mode == 'eval':
    out_dir = os.path.join(workdir, sweep.EVAL_DIR)
    _check_out_dir(out_dir, out_dir, report.RESULTS_JSON, 'rows')
  else:
    out_dir = os.path.join(workdir, probe.PROBE_DIR)
    _check_out_dir(out_dir, out_dir)
  if ev.ref_stats:
    _check_readable('ref_stats', ev.ref_stats, _check_reference)
  if ev.inception_weights:
    _check_readable('inception_weights', ev.inception_weights, inception.load_inception_weights)
