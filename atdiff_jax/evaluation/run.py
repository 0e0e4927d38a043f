"""A trained run, opened read-only for sampling: its config, its weights, a sampler factory.

`load_run` restores one params tree (the EMA params by default) of one checkpoint step with
Orbax, replicated over the mesh; nothing in the workdir is written or changed. The eval
settings (`config.eval`) are resolved here too, for the command line's sample and eval
modes (see `resolve_config`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from atdiff_jax import checkpoint, parallel, samplers, sampling
from atdiff_jax.samplers import options as sampler_options_lib
from atdiff_jax import config as config_lib
from atdiff_jax.models import create_model, inception
from atdiff_jax.train_state import make_optimizer
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import make_init_fn

log = logging.getLogger(__name__)

SampleFn = Callable[..., jax.Array]

# Compiled sampler and probe programs of this process, by network and setting. Params are an
# argument of each program, so every checkpoint of the same network (every arm and seed of
# an experiment) reuses one compile per (sampler, NFE, batch shape, options).
_PROGRAMS: dict[tuple, Callable[..., Any]] = {}


def network_key(config: ml_collections.ConfigDict) -> str:
  """What fixes a run's compiled programs apart from its params: the network, its noise
  process, the image shape and the objective's output parametrisation."""
  fields = {'model': config.model.to_dict(), 'diffusion': config.diffusion.to_dict(),
            'image': [config.data.image_size, config.data.channels],
            'objective': config_lib.objective_of(config)}
  if config_lib.is_consistency(config):
    fields['consistency'] = config.consistency.to_dict()
  return json.dumps(fields, sort_keys=True, default=str)


def compiled_program(run: 'Run', kind: str, settings: tuple, build: Callable[[], Any]) -> Any:
  """The program `build()` makes for `run`'s network and `settings`, built once a process."""
  key = (network_key(run.config), run.mesh, kind, settings)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


def clear_compiled_programs() -> None:
  """Forgets every cached program (the next call builds and compiles afresh)."""
  _PROGRAMS.clear()


@dataclasses.dataclass(frozen=True)
class Run:
  """One checkpoint of a training run, ready to sample from."""
  config: ml_collections.ConfigDict
  params: Any               # one params tree, replicated over `mesh`
  model: Any                # the Flax U-Net
  mesh: Mesh                # 1-D, axis 'data'
  step: int                 # the checkpoint's minibatch count
  workdir: str
  use_ema: bool = True
  ema_index: int = 0

  @property
  def default_batch_size(self) -> int:
    """`config.eval.batch_size` (256 for a config without an eval block)."""
    return int(self.config.eval.batch_size) if 'eval' in self.config else 256

  @property
  def weights_name(self) -> str:
    """'ema0.9999' or 'params': which weights were loaded, for result tables."""
    if not self.use_ema:
      return 'params'
    return f'ema{self.config.training.ema_rates[self.ema_index]}'

  @property
  def betas(self) -> np.ndarray:
    """The diffusion's beta schedule (float64), as the samplers take it."""
    return sampling.diffusion_betas(self.config)

  def model_fn(self) -> Callable[..., jax.Array]:
    """`model_fn(x, t, y, params) -> output` for the samplers (params passed, not baked in)."""
    return sampling.params_model_fn(self.model, self.config)

  def sample_fn(self, sampler: str = 'dpm_solver++', nfe: int = 10, eps_scale: float = 1.0,
                batch_size: int | None = None, **opts: Any) -> SampleFn:
    """A jitted `sample(rng, labels=None) -> images` in [-1, 1], (batch, H, W, C).

    One call draws `batch_size` images (default `config.eval.batch_size`, a multiple of
    the mesh's devices) with `nfe` network evaluations, sharded over the mesh. Noise is
    drawn on the global shape, so an rng gives the same images on any number of devices.
    Class-conditional models take int labels (batch,), by default 0, 1, ... mod classes.
    `opts` go to the sampler function (e.g. `eta` for DDIM, `order` for DPM-Solver++).
    """
    config = self.config
    batch_size = self.default_batch_size if batch_size is None else int(batch_size)
    devices = parallel.num_shards(self.mesh)
    if batch_size <= 0 or batch_size % devices:
      raise ValueError(f'batch_size {batch_size} must be a positive multiple of the '
                       f'{devices} devices')
    num_timesteps = config.diffusion.num_timesteps
    if not 1 <= nfe <= num_timesteps:
      raise ValueError(f'nfe must be in 1..{num_timesteps} (the diffusion steps), got {nfe}')
    if eps_scale <= 0:
      raise ValueError(f'eps_scale must be > 0, got {eps_scale}')
    size, channels = config.data.image_size, config.data.channels
    shape = (batch_size, size, size, channels)
    opts = sampling.sampler_defaults(config, sampler) | opts

    def build():
      sample = samplers.make_sample_fn(self.model_fn(), sampler, self.betas, int(nfe), shape,
                                       self.mesh, eps_scale=float(eps_scale), **opts)
      return jax.jit(lambda rng, labels, params: jnp.clip(sample(rng, labels, params),
                                                          -1.0, 1.0),
                     out_shardings=parallel.batch_sharding(self.mesh))

    clipped = compiled_program(self, 'sample', (sampler, int(nfe), float(eps_scale), shape,
                                                options_key(opts)), build)
    num_classes = int(config.model.num_classes)
    default_labels = (jnp.arange(batch_size, dtype=jnp.int32) % num_classes
                      if num_classes else None)
    params = self.params

    def sample_images(rng: jax.Array, labels: jax.Array | None = None) -> jax.Array:
      if num_classes:
        labels = default_labels if labels is None else jnp.asarray(labels, jnp.int32)
      elif labels is not None:
        raise ValueError('labels given, but the model is unconditional')
      return clipped(rng, labels, params)

    return sample_images


def options_key(opts: dict[str, Any]) -> str:
  """Sampler options as a hashable key (lists and tuples alike)."""
  return json.dumps(opts, sort_keys=True, default=str)


def _step_dir(workdir: str, step: int | None) -> str:
  if step is None:
    return checkpoint.find_checkpoint(workdir)
  directory = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
  path = os.path.join(directory, str(step))
  if not os.path.isdir(path):
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
        directory) else []
    raise checkpoint.CheckpointError(f'no checkpoint for step {step} in {directory} '
                                     f'(steps there: {steps or "none"})')
  return path


def load_run(workdir: str, step: int | None = None, use_ema: bool = True, ema_index: int = 0,
             mesh: Mesh | None = None, config: ml_collections.ConfigDict | None = None) -> Run:
  """Opens checkpoint `step` (default: the latest) of the run in `workdir`, read-only.

  Restores only the params tree asked for: `ema_params[ema_index]` (one per
  `config.training.ema_rates`) or, with `use_ema=False`, the raw training params. The
  abstract tree comes from the run's config via `make_init_fn`, and the arrays land
  replicated on `mesh` (default: all devices). `config` replaces `workdir/config.json`
  (it must describe the same model). Raises `checkpoint.CheckpointError` when the
  checkpoint is missing or does not fit the config.
  """
  config = checkpoint.load_config(workdir) if config is None else config
  config_lib.validate_model(config)
  num_ema = len(config.training.ema_rates)
  if use_ema and not 0 <= ema_index < num_ema:
    raise config_lib.ConfigError(
        f'config.eval.ema_index={ema_index}: the run keeps {num_ema} EMA trees '
        f'(training.ema_rates={tuple(config.training.ema_rates)})')
  mesh = make_mesh() if mesh is None else mesh
  step_dir = _step_dir(workdir, step)
  model = create_model(config)
  abstract = jax.eval_shape(make_init_fn(config, model, make_optimizer(config.training)),
                            jax.random.key(0))
  replicated = parallel.replicated(mesh)
  target_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract.params)
  params = checkpoint.restore_params(step_dir, target_params, ema_index if use_ema else None)
  return Run(config=config, params=params, model=model, mesh=mesh,
             step=int(os.path.basename(step_dir)), workdir=os.path.abspath(workdir),
             use_ema=use_ema, ema_index=ema_index)


# ------------------------------------------------------------------ eval settings


def sampler_options(eval_config: ml_collections.ConfigDict, sampler: str) -> dict[str, Any]:
  """`config.eval.sampler_options` for `sampler` ('dpm_solver++' -> 'dpm_solver_pp')."""
  key = sampler.replace('++', '_pp')
  options = eval_config.get('sampler_options') or {}
  block = options.get(key) if hasattr(options, 'get') else None
  if block is None:
    return {}
  return dict(block.to_dict() if hasattr(block, 'to_dict') else block)


def _plain(block: Any) -> Any:
  """A config block as plain JSON values (tuples and lists compare equal)."""
  return json.loads(ml_collections.ConfigDict(block).to_json_best_effort())


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
  later = config_lib.LATER_MODEL_FIELDS
  ours = {'model': later | _plain(config.model), 'diffusion': _plain(config.diffusion),
          'data': {k: config.data[k] for k in ('image_size', 'channels')}}
  theirs = {'model': later | _plain(override.model), 'diffusion': _plain(override.diffusion),
            'data': {k: override.data[k] for k in ('image_size', 'channels')}}
  differ = [f'{block}.{k}={theirs[block].get(k)!r} (the run: {ours[block].get(k)!r})'
            for block in ours for k in sorted(set(ours[block]) | set(theirs[block]))
            if k not in config_lib.COMPUTE_FIELDS and ours[block].get(k) != theirs[block].get(k)]
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
  raise config_lib.ConfigError(f'config.eval.{field}={value!r}: {why}')


def _check_sampler(field: str, name: Any, ev: ml_collections.ConfigDict) -> None:
  """A known sampler, and options (config.eval.sampler_options) it can use."""
  if name not in samplers.SAMPLERS:
    _fail(field, name, f'must be one of {", ".join(samplers.SAMPLERS)}')
  sampler_options_lib.check_config_options(ev)


def _check_nfe(field: str, nfe: Any, num_timesteps: int) -> None:
  if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= num_timesteps:
    _fail(field, nfe, f'must be an integer in 1..{num_timesteps} (diffusion.num_timesteps)')


def _check_eps_scale(field: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    _fail(field, value, 'must be a number > 0 (1 = no epsilon scaling)')


def _check_consistency_times(config: ml_collections.ConfigDict, nfes: tuple[int, ...]) -> None:
  """Given consistency timesteps must fit every NFE asked for (one time per step) and lie
  above the run's t_min (f is the identity there); without them, a given sigma_max must lie
  above t_min's noise level (the default times run from one to the other)."""
  num_timesteps = config.diffusion.num_timesteps
  given = sampler_options(config.eval, 'consistency')
  t_min = sampling.sampler_defaults(config, 'consistency').get('t_min', 0.0)
  times = tuple(given.get('timesteps') or ())
  if not times:
    if given.get('sigma_max') is not None:
      abar = np.cumprod(1.0 - sampling.diffusion_betas(config))[int(t_min)]
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


def open_run(workdir: str, override: ml_collections.ConfigDict | None, mode: str) -> Run:
  """The command line's way in: resolve and check the config, then `load_run`."""
  config = resolve_config(workdir, override)
  validate_eval(config, mode, jax.device_count())
  ev = config.eval
  return load_run(workdir, None if ev.step == -1 else ev.step, bool(ev.use_ema),
                  int(ev.ema_index), config=config)
