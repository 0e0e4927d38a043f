"""The train step under each adversarial-training variant: compile time, speed, memory.

Every variant is the given config with only `adv.method` / `adv.steps` changed, so the
ratios to `none` read directly as the cost of adversarial training, for any objective.
Batches are synthetic (the config's shape, no dataset), the state is donated as in
training, and all variants start from the same initial state; a distillation teacher is a
copy of the student's initial weights (no teacher run is read).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from atdiff_jax import config as config_lib, parallel
from atdiff_jax.bench import common
from atdiff_jax.config import updates_per_minibatch
from atdiff_jax.models import abstract_params, create_model
from atdiff_jax.parallel import make_mesh
from atdiff_jax.replay import resolve_loop
from atdiff_jax.train_step import (TrainParts, create_train_state, make_train_step,
                                   num_params)

# Metrics that get a ratio to the `none` variant.
RATIO_METRICS = ('s_per_call', 's_per_update', 'images_per_s', 'updates_per_s')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One AT setting: `method` in none | free | pgd | fgsm and its K (`adv.steps`), and
  optionally how its passes compile (`adv.replay_loop`) and what the U-Net recomputes
  (`model.remat`); None keeps the config's."""
  method: str
  steps: int = 1
  loop: str | None = None
  remat: str | None = None

  @property
  def name(self) -> str:
    name = self.method if self.method in ('none', 'fgsm') else f'{self.method} K={self.steps}'
    options = [o for o in (self.loop, self.remat and f'remat {self.remat}') if o]
    return f'{name} ({", ".join(options)})' if options else name

  @property
  def passes(self) -> int:
    """Forward/backward passes over the minibatch per call: the work of `steps` updates."""
    return {'none': 1, 'free': self.steps, 'pgd': self.steps + 1, 'fgsm': 2}[self.method]


@dataclasses.dataclass(frozen=True)
class Reference:
  """Another implementation's train step, timed in the same rounds as the variants
  (torch_reference.py): `start()` returns its call, one optimizer update per call."""
  name: str
  num_params: int
  start: Callable[[], Callable[[], Any]]
  device: str = 'cpu'


class ReferenceMismatch(config_lib.ConfigError):
  """The reference's network is not this config's network."""


DEFAULT_VARIANTS = (Variant('none'), Variant('free', 3), Variant('pgd', 1), Variant('pgd', 3),
                    Variant('fgsm'))
SPEC_HELP = ('method[:K][@option...], options: unrolled | rolled (adv.replay_loop), '
             f'remat=<{"|".join(config_lib.REMAT_MODES)}> (model.remat)')


def _parse_options(item: str, options: list[str]) -> dict[str, str]:
  parsed = {}
  for option in options:
    key, value = ('loop', option) if '=' not in option else option.split('=', 1)
    if key == 'loop' and value in ('unrolled', 'rolled'):
      parsed['loop'] = value
    elif key == 'remat' and value in config_lib.REMAT_MODES:
      parsed['remat'] = value
    else:
      raise ValueError(f'AT variant {item!r}: unknown option {option!r} ({SPEC_HELP})')
  return parsed


def parse_variants(spec: str) -> tuple[Variant, ...]:
  """'none,free:3,free:3@rolled,none@remat=blocks' -> variants; a plain `none` is put first
  when missing (the baseline)."""
  variants = []
  for item in (s.strip() for s in spec.split(',')):
    if not item:
      continue
    head, *options = item.split('@')
    method, _, k = head.partition(':')
    if method not in config_lib.ADV_METHODS:
      raise ValueError(f'unknown AT variant {item!r}: the method must be one of '
                       f'{", ".join(config_lib.ADV_METHODS)} ({SPEC_HELP})')
    if method in ('none', 'fgsm') and k:
      raise ValueError(f'AT variant {item!r}: {method} takes no K')
    if method in ('free', 'pgd') and not k:
      raise ValueError(f'AT variant {item!r}: {method} needs K, e.g. {method}:3')
    try:
      steps = int(k) if k else 1
    except ValueError:
      raise ValueError(f'AT variant {item!r}: K must be an integer') from None
    if steps < 1:
      raise ValueError(f'AT variant {item!r}: K must be >= 1')
    variant = Variant(method, steps, **_parse_options(item, options))
    if variant not in variants:
      variants.append(variant)
  if Variant('none') not in variants:
    variants.insert(0, Variant('none'))
  return tuple(variants)


def variant_config(config: ml_collections.ConfigDict,
                   variant: Variant) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's AT method and K (and loop, remat when given)."""
  config = config.copy_and_resolve_references()
  config.adv.method = variant.method
  config.adv.steps = variant.steps
  if variant.loop is not None:
    config.adv.replay_loop = variant.loop
  if variant.remat is not None:
    config.model.remat = variant.remat
  return config


def synthetic_batch(config: ml_collections.ConfigDict, mesh: Mesh, seed: int = 0,
                    stack: int | None = None) -> dict:
  """A global batch of the config's shape, sharded over the mesh like the data stream's:
  one minibatch, or `stack` of them along a leading axis (several minibatches per call)."""
  rng = np.random.default_rng(seed)
  lead = (config.training.batch_size,) if stack is None else (stack,
                                                               config.training.batch_size)
  images = rng.uniform(-1.0, 1.0, (*lead, *config_lib.image_shape(config))).astype(np.float32)
  labels = rng.integers(0, max(1, config.model.num_classes), lead).astype(np.int32)
  sharding = (parallel.batch_sharding(mesh) if stack is None
              else parallel.stacked_batch_sharding(mesh))
  return {'image': jax.device_put(images, sharding), 'label': jax.device_put(labels, sharding)}


def _starter(compiled, host_state, batch, frozen, mesh: Mesh):
  """A function that puts a fresh copy of the initial state on the devices and returns a
  call running one step on it (each call donates the state and keeps the new one)."""
  replicated = parallel.replicated(mesh)

  def start():
    holder = [jax.device_put(host_state, replicated)]

    def call():
      holder[0], metrics = compiled(holder[0], batch, frozen)
      return metrics

    return call

  return start


def bench_train(config: ml_collections.ConfigDict,
                variants: Sequence[Variant] = DEFAULT_VARIANTS,
                steps: int = 5,
                warmup: int = 1,
                repeats: int = 3,
                mesh: Mesh | None = None,
                model=None,
                log=None,
                peak_tflops: float = 0.0,
                reference: Reference | None = None) -> dict[str, Any]:
  """Measures every variant in this process; returns JSON-ready numbers.

  `model` defaults to the one `config.model` describes. `peak_tflops` > 0 sets the
  device's peak for the MFU (else a table of known devices; CPUs have none). A `reference`
  (another implementation of the `none` step, e.g. torch_reference.build) is warmed up and
  timed in the same rounds, after the variants; its parameter count must be this model's
  (ReferenceMismatch, raised before anything compiles).

  First each variant is compiled and warmed up (at least one call, after which the
  process's peak memory is read), then the timed runs visit the variants in turn for
  `repeats` rounds of `steps` calls; s_per_call is each variant's best round.

  Result: {'batch_size', 'num_params', 'steps', 'warmup', 'repeats', 'variants': [per
  variant: name, method, k, loop, remat, passes_per_call, updates_per_call, compile_s,
  xla_flops_per_call (per device), s_per_call (best round), round_s_per_call (every round),
  s_per_update, images_per_s, updates_per_s, ratio_to_none {metric: value / none's value},
  model_flops_per_s, mfu (None where the device's peak is unknown), xla_memory,
  peak_memory], model_flops_per_image, peak_flops_per_device, and with a reference
  'reference': {name, device, num_params, s_per_call, round_s_per_call, s_per_update,
  images_per_s, updates_per_s, ratio_to_none, none_over_reference (none's s_per_update over
  the reference's: above 1, the reference is faster)}}.
  """
  mesh = make_mesh() if mesh is None else mesh
  variants = tuple(variants)
  if not variants or variants[0] != Variant('none'):
    raise ValueError('the first variant must be none: every ratio is taken to it')
  configs = [variant_config(config, v) for v in variants]
  for c in configs:  # every variant's config is checked before anything compiles
    config_lib.validate_training(c, mesh.size)

  given_model = model
  parts = TrainParts.build(config, model)
  model, tx = parts.model, parts.tx
  if reference is not None:  # shapes only: nothing compiles before this check
    count = num_params(abstract_params(config, model))
    if reference.num_params != count:
      raise ReferenceMismatch(
          f'the reference ({reference.name}) has {reference.num_params:,} parameters, this '
          f'project\'s network {count:,}: they are not the same network')
  # One initial state for all variants, kept on the host so that it adds nothing to the
  # device memory that is measured.
  state = create_train_state(config, mesh, parts)
  host_state = jax.device_get(state)
  del state
  batch = synthetic_batch(config, mesh, config.seed)
  # A distillation teacher of the student's shape (its initial weights: same speed as any).
  frozen = jax.device_put(parts.objective.init_frozen(host_state.params),
                          parallel.replicated(mesh))

  rows, starts = [], []
  for variant, c in zip(variants, configs):
    if log:
      log(f'train: compiling {variant.name}')
    # A remat variant recomputes inside the same network (same params), so only its model
    # object differs; a model given by the caller is used as it is.
    variant_model = model if given_model is not None or variant.remat is None else (
        create_model(c))
    step = make_train_step(c, mesh, TrainParts.build(c, variant_model, tx))
    compiled, compile_s = common.time_compile(
        step, jax.device_put(host_state, parallel.replicated(mesh)), batch, frozen)
    start = _starter(compiled, host_state, batch, frozen, mesh)
    warm_start = time.perf_counter()
    common.warm_up(start(), max(warmup, 1))
    if log:  # as it happens: a run cut short still shows where its time went
      log(f'train: {variant.name}: compiled in {compile_s:.1f} s, warm-up '
          f'{time.perf_counter() - warm_start:.1f} s')
    starts.append(start)
    rows.append({
        'name': variant.name, 'method': variant.method, 'k': variant.steps,
        'loop': resolve_loop(c.adv.replay_loop, mesh.devices.flat[0].platform,
                              config_lib.replay_passes(c)),
        'remat': c.model.remat, 'passes_per_call': variant.passes,
        'updates_per_call': updates_per_minibatch(c), 'compile_s': compile_s,
        'xla_flops_per_call': common.compiled_flops(compiled),
        'xla_memory': common.compiled_memory(compiled), 'peak_memory': common.peak_memory(),
    })
  timed = list(rows)
  if reference is not None:
    if log:
      log(f'train: warming up {reference.name} on {reference.device}')
    common.warm_up(reference.start(), max(warmup, 1))
    starts.append(reference.start)
    timed.append({'name': reference.name, 'device': reference.device,
                  'num_params': reference.num_params, 'updates_per_call': 1})
  if log:
    log(f'train: timing {len(timed)} entries, {repeats} rounds of {steps} calls')
  for row, times in zip(timed, common.round_robin(starts, steps, repeats)):
    s_per_call = min(times)
    row.update({
        's_per_call': s_per_call,
        'round_s_per_call': times,
        's_per_update': s_per_call / row['updates_per_call'],
        'images_per_s': config.training.batch_size / s_per_call,
        'updates_per_s': row['updates_per_call'] / s_per_call,
    })
  base = rows[0]
  extra = {}
  if reference is not None:
    ref = timed[-1]
    ref['ratio_to_none'] = {m: ref[m] / base[m] for m in RATIO_METRICS}
    ref['none_over_reference'] = base['s_per_update'] / ref['s_per_update']
    extra['reference'] = ref
  # The model's FLOPs per forward/backward pass over the minibatch, per device: XLA's count
  # of the `none` step (a rolled loop's body would be counted once, whatever its trips).
  pass_flops = base['xla_flops_per_call']
  peak = common.peak_flops(mesh.devices.flat[0], config.model.dtype, peak_tflops)
  for row in rows:
    row['ratio_to_none'] = {m: row[m] / base[m] for m in RATIO_METRICS}
    row['model_flops_per_s'] = (None if pass_flops is None
                                else pass_flops * row['passes_per_call'] / row['s_per_call'])
    row['mfu'] = (None if row['model_flops_per_s'] is None or peak is None
                  else row['model_flops_per_s'] / peak)
  return {
      'batch_size': int(config.training.batch_size),
      'num_params': num_params(host_state.params),
      'model_flops_per_image': (None if pass_flops is None
                                else pass_flops * mesh.size / config.training.batch_size),
      'peak_flops_per_device': peak,
      'steps': steps,
      'warmup': max(warmup, 1),
      'repeats': repeats,
      'variants': rows,
      **extra,
  }
