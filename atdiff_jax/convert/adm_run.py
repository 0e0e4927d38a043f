"""A guided-diffusion / improved-diffusion checkpoint, written as a run of this project.

The run is what training writes at step 0: `config.json` and an Orbax checkpoint of the
whole TrainState, whose params and every EMA tree are the imported weights, with a fresh
optimizer state. So sampling, evaluation and probing (`--workdir=RUN`), `load_run(RUN)`
and fine-tuning (`--config.init_from=RUN`, `--config.teacher=RUN`) take it as it is.

Nothing is written unless the whole import succeeds: the state is built in memory, saved
to a temporary folder next to the workdir and renamed into place.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from atdiff_jax import checkpoint
from atdiff_jax import config as config_lib
from atdiff_jax.convert import adm_params, gd_options
from atdiff_jax.convert.errors import ConversionError
from atdiff_jax.convert.state_dict import read_state_dict
from atdiff_jax.models.unet import count_params
from atdiff_jax.train_state import TrainState
from atdiff_jax.train_step import TrainParts, abstract_state

log = logging.getLogger(__name__)


def import_run(input_path: str, workdir: str, config: ml_collections.ConfigDict, *,
               options: Mapping[str, Any] | None = None, attention_order: str | None = None,
               keep: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Writes the checkpoint in `input_path` (.pt or .npz state dict) as the run `workdir`.

  `config` gives the run's data, training and eval blocks, and its model and diffusion
  unless `options` (guided-diffusion's complete flags, `gd_options.complete_options`) set
  them; fields named in `keep` (e.g. 'model.dtype') keep the config's value. Without
  options the attention order ('legacy' or 'new') must be given: shapes cannot tell it.
  Returns the run's config.
  """
  workdir = os.path.abspath(workdir)
  _check_free(workdir)
  state = read_state_dict(input_path)
  config, attention_order = run_config(config, state, options, attention_order, keep)
  params = adm_params.import_params(state, config, attention_order)
  write_run(workdir, config, params)
  log.info('Imported %s (%s params, %d tensors, %s attention order) as %s.',
           os.path.basename(input_path), f'{count_params(params):,}', len(state),
           attention_order, workdir)
  return config


def run_config(config: ml_collections.ConfigDict, state: Mapping[str, Any],
               options: Mapping[str, Any] | None, attention_order: str | None,
               keep: Iterable[str] = ()) -> tuple[ml_collections.ConfigDict, str]:
  """(the run's config, the checkpoint's attention order), checked."""
  config = copy.deepcopy(config)
  if options is not None:
    translation = gd_options.translate(options, state)
    if attention_order not in (None, translation.attention_order):
      raise ConversionError(
          f'attention order {attention_order!r} contradicts the checkpoint\'s flags '
          f'(--use_new_attention_order {translation.attention_order == "new"})')
    attention_order = translation.attention_order
    for note in translation.notes:
      log.info('%s', note)
    _apply(config, translation.fields, set(keep))
  elif attention_order is None:
    raise ConversionError(
        'the attention order cannot be read from the checkpoint\'s shapes: give it '
        '(new: guided-diffusion\'s --use_new_attention_order True, e.g. 64x64_diffusion.pt; '
        'legacy: its default, and every improved-diffusion model), or give the '
        'checkpoint\'s guided-diffusion flags')
  if attention_order not in adm_params.ATTENTION_ORDERS:
    raise ConversionError(f'attention order {attention_order!r}: must be one of '
                          f'{", ".join(adm_params.ATTENTION_ORDERS)}')
  objective = config_lib.objective_of(config)
  if objective != 'dpm':
    raise config_lib.ConfigError(
        f'config.objective={objective!r}: an imported checkpoint is a diffusion model '
        '(objective dpm); distil or train consistency models from the imported run with '
        '--config.teacher=RUN or --config.init_from=RUN')
  config_lib.validate_model(config)
  return config, attention_order


def _apply(config: ml_collections.ConfigDict, fields: Mapping[str, Any], keep: set[str]) -> None:
  with config.unlocked():
    for field, value in fields.items():
      *parents, leaf = field.split('.')
      node = config
      for part in parents:
        if part not in node:
          node[part] = ml_collections.ConfigDict()
        node = node[part]
      if field in keep:
        if leaf in node and node[leaf] != value:
          log.info('Keeping --config.%s=%r over the checkpoint\'s %r.', field, node[leaf],
                   value)
        continue
      node[leaf] = value


def build_state(config: ml_collections.ConfigDict, params: Any) -> TrainState:
  """The step-0 TrainState of training's initialisation, with `params` as the params and
  every EMA tree."""
  parts = TrainParts.build(config)
  num_ema = len(config.training.ema_rates)
  # One compiled program rather than an op per leaf: the optimizer and EMA trees are copies.
  state = jax.jit(lambda p: TrainState.create(p, parts.tx, num_ema,
                                              parts.objective.init_state(p)))(
      jax.tree.map(jnp.asarray, params))
  expected = abstract_state(config, parts)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  if shapes(state) != shapes(expected):
    raise ConversionError('the imported params do not form the train state the config '
                          'describes')
  return state


def write_run(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
  """`workdir` as a step-0 run of `config` whose weights are `params`; all or nothing."""
  workdir = os.path.abspath(workdir)
  _check_free(workdir)
  state = build_state(config, params)
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(workdir)}.importing-', dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # as a folder training makes; mkdtemp's is private
    ckpt = checkpoint.Checkpointer(staging, keep=config.training.keep_checkpoints,
                                   async_save=False)
    ckpt.save(0, state)
    ckpt.close()
    checkpoint.save_config(staging, config)
    _check_free(workdir)  # again: another process may have written it meanwhile
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # empty
    os.rename(staging, workdir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _check_free(workdir: str) -> None:
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise ConversionError(f'{workdir} exists and is not empty; give a new workdir')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConversionError(f'{workdir} exists and is not a folder')
