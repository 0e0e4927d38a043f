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

from atdiff_jax import checkpoint, parallel, samplers
from atdiff_jax.samplers import from_config
from atdiff_jax import config as config_lib
from atdiff_jax.diffusion import betas_of
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.models import abstract_params, create_model
from atdiff_jax.parallel import make_mesh
from atdiff_jax.views import view_of

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
            'image': config_lib.image_shape(config), 'view': view_of(config).key()}
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
    return betas_of(self.config)

  def model_fn(self) -> Callable[..., jax.Array]:
    """`model_fn(x, t, y, params) -> output` for the samplers (params passed, not baked in)."""
    return from_config.params_model_fn(self.model, self.config)

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
    shape = (batch_size, *config_lib.image_shape(config))
    opts = from_config.sampler_defaults(config, sampler) | opts

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


def load_run(workdir: str, step: int | None = None, use_ema: bool = True, ema_index: int = 0,
             mesh: Mesh | None = None, config: ml_collections.ConfigDict | None = None) -> Run:
  """Opens checkpoint `step` (default: the latest) of the run in `workdir`, read-only.

  Restores only the params tree asked for: `ema_params[ema_index]` (one per
  `config.training.ema_rates`) or, with `use_ema=False`, the raw training params. The
  abstract tree comes from the run's config (`models.abstract_params`), and the arrays land
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
  step_dir = checkpoint.step_folder(workdir, step)
  model = create_model(config)
  target = abstract_params(config, model, parallel.replicated(mesh))
  params = checkpoint.restore_params(step_dir, target, ema_index if use_ema else None)
  return Run(config=config, params=params, model=model, mesh=mesh,
             step=int(os.path.basename(step_dir)), workdir=os.path.abspath(workdir),
             use_ema=use_ema, ema_index=ema_index)


def open_run(workdir: str, override: ml_collections.ConfigDict | None, mode: str,
             check: Callable[[ml_collections.ConfigDict], None] | None = None) -> Run:
  """The command line's way in: resolve and check the config (and with `check`, what else
  the mode needs), the files it reads and writes, then `load_run`. `mode`: sample, eval or
  probe (which samples with the config.eval.sampler setting)."""
  config = eval_settings.resolve_config(workdir, override)
  eval_settings.validate_eval(config, 'sample' if mode == 'probe' else mode,
                              jax.device_count())
  if check is not None:
    check(config)
  eval_settings.check_files(workdir, config, mode)
  ev = config.eval
  return load_run(workdir, None if ev.step == -1 else ev.step, bool(ev.use_ema),
                  int(ev.ema_index), config=config)
