"""A run's config: its checks, and the views of it that every room shares (image shape,
the perturbed t-range, updates per minibatch), with no dependency but ml_collections.

The training fields are checked here (`validate_training`), once, before anything compiles;
the eval block in `evaluation/settings.py`, the samplers' options in `samplers/options.py`
and the probe's in `evaluation/probe.py`, all with this module's `fail`. Errors are one line
naming the field, the value and what is allowed, so that a typo on the command line costs
seconds rather than a compile.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import ml_collections

SCHEDULES = ('linear', 'cosine')
TIMESTEP_SAMPLERS = ('uniform', 'loss_second_moment')
DTYPES = ('float32', 'bfloat16')
REMAT_MODES = ('none', 'attention', 'blocks')
ADV_METHODS = ('none', 'free', 'pgd', 'fgsm')
ADV_NORMS = ('l2', 'linf')
# Units of adv.radius and adv.step_size: absolute (the norm's own) or per_dim (per-pixel RMS:
# an L2 value times sqrt(H*W*C)), which gives the same strength on every image shape.
ADV_SCALES = ('per_dim', 'absolute')
ADV_RADIUS_SCHEDULES = ('constant', 'sigma')
ADV_REPLAY_LOOPS = ('auto', 'unrolled', 'rolled')
ADV_INITS = ('zero', 'uniform')
ADV_TARGETS = ('original', 'delta', 'delta_detach')
OBJECTIVES = ('dpm', 'cd', 'ct')
CM_SCALINGS = ('lcm', 'cm')
CM_PAIRS = ('grid', 'improved_ct', 'ect')
CM_GRIDS = ('karras', 'uniform')
CM_DISTANCES = ('l2', 'pseudo_huber')
CM_WEIGHTINGS = ('uniform', 'inverse_gap')
CM_TEACHER_SOLVERS = ('ddim', 'heun')
CM_TARGETS = ('clean', 'perturbed')

# Model fields added after runs were first written, with the value that builds the network
# those runs trained: their config.json still loads, and compares equal to a config that
# spells the default out.
LATER_MODEL_FIELDS = {'num_heads_upsample': -1, 'timestep_scale': 1.0, 'remat': 'none'}
# Model fields that change how the network computes, not what: checkpoints of configs that
# differ only in them are interchangeable.
COMPUTE_FIELDS = ('dtype', 'remat')
# The fields (a block name covers all of its fields) that fix the network and its noise
# process: another run's weights fit this one only where they agree.
NETWORK_FIELDS = ('data.image_size', 'data.channels', 'model', 'diffusion.schedule',
                  'diffusion.num_timesteps')
# Fields a resumed run may change: how long, how fast and how carefully it trains, what it
# logs, keeps, samples and evaluates, where its data lies, and how it computes. Any other
# field that differs from the run's config.json would continue its checkpoint as another run.
RESUMABLE_FIELDS = (
    'training.lr', 'training.warmup_steps', 'training.weight_decay', 'training.grad_clip',
    'training.num_steps', 'training.log_every', 'training.checkpoint_every',
    'training.keep_checkpoints', 'training.sample_every', 'training.num_samples',
    'training.sample_steps', 'training.multi_host', 'training.stop_after_nonfinite',
    'training.max_update_ratio', 'training.profile', 'training.minibatches_per_call',
    'data.path', 'data.tfds_data_dir', 'data.verify_images',
    'data.skip_unreadable', 'init_from', 'adv.replay_loop', 'eval', 'probe')


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def fail(field: str, value: Any, why: str) -> None:
  """Raises ConfigError for config.<field>=<value>: the one-line form every check uses."""
  raise ConfigError(f'config.{field}={value!r}: {why}')


def _choice(config: ml_collections.ConfigDict, field: str, allowed: Iterable[str]) -> None:
  value = _get(config, field)
  allowed = tuple(allowed)
  if value not in allowed:
    fail(field, value, f'must be one of {", ".join(allowed)}')


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split('.'):
    if part not in node:
      raise ConfigError(f'config.{field} is missing')
    node = node[part]
  return node


def model_field(model: ml_collections.ConfigDict, name: str) -> Any:
  """`config.model.<name>`, or its default for a field added later (LATER_MODEL_FIELDS)."""
  return model.get(name, LATER_MODEL_FIELDS.get(name))


def network_differences(ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict,
                        ignore: Iterable[str] = ()) -> list[str]:
  """The fields ('model.num_heads', ...) in which two configs describe another network or
  noise process: NETWORK_FIELDS, but COMPUTE_FIELDS and the model fields in `ignore`."""
  skip = COMPUTE_FIELDS + tuple(ignore)
  fields = []
  for field in NETWORK_FIELDS:
    fields += ([f'model.{k}' for k in sorted(set(ours.model) | set(theirs.model))
                if k not in skip] if field == 'model' else [field])
  return [field for field in fields if _differs(ours, theirs, field)]


def resume_differences(ours: ml_collections.ConfigDict,
                       theirs: ml_collections.ConfigDict) -> list[str]:
  """The fields in which `ours` would resume the run of `theirs` (its config.json) as
  another run: network_differences (dropout included: it is part of the training), then
  the objective, then every other field but RESUMABLE_FIELDS and those neither run reads.
  A field only one of them has was added after the other run was written, which trained
  with its default, so it is not compared."""
  differ = network_differences(ours, theirs)
  unread = set(_unread_fields(ours)) & set(_unread_fields(theirs))
  skip = NETWORK_FIELDS + RESUMABLE_FIELDS + tuple(unread) + ('objective',)
  shared = sorted(set(field_paths(ours)) & set(field_paths(theirs)))
  rest = ['objective'] + [f for f in shared if not _is_under(f, skip)]
  return differ + [field for field in rest if _differs(ours, theirs, field)]


# Resumable fields whose switch between 0 (off) and on changes the optimizer's state (a clip,
# a schedule's count): a checkpoint holds the one state, so a resume may change their value
# but not turn them on or off.
OPTIMIZER_SWITCHES = ('training.grad_clip', 'training.warmup_steps')


def switched_optimizer_fields(ours: ml_collections.ConfigDict,
                              theirs: ml_collections.ConfigDict) -> list[str]:
  """The OPTIMIZER_SWITCHES that one config has on (non-zero) and the other off."""
  return [f for f in OPTIMIZER_SWITCHES
          if f in field_paths(ours) and f in field_paths(theirs)
          and bool(field_value(ours, f)) != bool(field_value(theirs, f))]


def _unread_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The fields (or blocks) that `config`'s run never reads: another objective's, and the
  AT settings of a run without AT."""
  unread = [] if is_consistency(config) else ['consistency']
  unread += [] if objective_of(config) == 'cd' else ['teacher']
  if config.adv.method == 'none':
    unread += [f'adv.{k}' for k in config.adv if k != 'method']
  return tuple(unread)


def _is_under(field: str, prefixes: Iterable[str]) -> bool:
  return any(field == p or field.startswith(p + '.') for p in prefixes)


def _differs(ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict,
             field: str) -> bool:
  plain = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # JSON stores tuples as lists
  return plain(field_value(ours, field)) != plain(field_value(theirs, field))


def field_value(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of a dotted field, with LATER_MODEL_FIELDS' defaults for the model block
  and objective_of's for the objective."""
  block, _, name = field.partition('.')
  if block == 'model':
    return model_field(config.model, name)
  return objective_of(config) if field == 'objective' else _get(config, field)


def is_number(value: Any) -> bool:
  """A finite int or float (not a bool)."""
  return (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value))


def _is_sequence(value: Any) -> bool:
  """A tuple or list (a string is not one here: "(0.999,)" given as text is an error)."""
  return isinstance(value, (tuple, list))


def field_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every leaf field of `config` as a dotted path, e.g. 'training.lr'."""
  paths = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      paths += field_paths(value, f'{path}.')
    else:
      paths.append(path)
  return paths


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """None when `path` names a field of `config`; else one line naming it, with the
  closest valid names."""
  node = config
  for depth, part in enumerate(path.split('.')):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      break
    node = node[part]
  else:
    return None
  known = field_paths(config)
  leaf = path.split('.')[-1]
  same_leaf = [k for k in known if k.split('.')[-1] == leaf]
  close = same_leaf + [k for k in difflib.get_close_matches(path, known, n=3, cutoff=0.6)
                       if k not in same_leaf]
  parent = '.'.join(path.split('.')[:depth])
  where = f'config.{parent}' if parent else 'config'
  hint = (f'; did you mean {" or ".join(f"config.{k}" for k in close[:3])}?' if close else
          f'; {where} has: {", ".join(sorted(node.keys()))}'
          if isinstance(node, ml_collections.ConfigDict) else '')
  return f'config.{path}: no such field{hint}'


def _positive(config, field: str, *, allow_zero: bool = False, integer: bool = False) -> None:
  check_number(field, _get(config, field), allow_zero=allow_zero, integer=integer)


def check_number(field: str, value: Any, *, allow_zero: bool = False,
                 integer: bool = False) -> None:
  """`value` of config.<field> is a finite number > 0 (>= 0 with `allow_zero`; whole with
  `integer`), or ConfigError naming the field."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    fail(field, value, 'must be a number')
  if not math.isfinite(value):
    fail(field, value, 'must be a finite number')
  if integer and int(value) != value:
    fail(field, value, 'must be an integer')
  if value < 0 or (value == 0 and not allow_zero):
    fail(field, value, 'must be >= 0' if allow_zero else 'must be > 0')


def validate_model(config: ml_collections.ConfigDict) -> None:
  """Model and diffusion fields, which sampling and evaluation need too."""
  _positive(config, 'model.ch', integer=True)
  _positive(config, 'model.num_res_blocks', integer=True)
  ch_mult = config.model.ch_mult
  if (not _is_sequence(ch_mult) or not ch_mult
      or any(not is_number(m) or int(m) != m or m <= 0 for m in ch_mult)):
    fail('model.ch_mult', ch_mult, 'must be a non-empty tuple of positive integers')
  for mult in ch_mult:
    if (config.model.ch * mult) % 32:
      fail('model.ch', config.model.ch,
            f'times every ch_mult must be a multiple of 32 (GroupNorm uses 32 groups); '
            f'{config.model.ch} * {mult} is not')
  if not 0.0 <= config.model.dropout < 1.0:
    fail('model.dropout', config.model.dropout, 'must be in [0, 1)')
  _choice(config, 'model.dtype', DTYPES)
  _positive(config, 'model.num_classes', allow_zero=True, integer=True)
  if config.model.num_head_channels != -1:
    _positive(config, 'model.num_head_channels', integer=True)
  else:
    _positive(config, 'model.num_heads', integer=True)
  # Fields added later are optional: a run's config.json from before them still loads.
  if config.model.get('num_heads_upsample', -1) != -1:
    _positive(config, 'model.num_heads_upsample', integer=True)
  if 'timestep_scale' in config.model:
    _positive(config, 'model.timestep_scale')
  if 'remat' in config.model:
    _choice(config, 'model.remat', REMAT_MODES)

  size = config.data.image_size
  _positive(config, 'data.image_size', integer=True)
  _positive(config, 'data.channels', integer=True)
  downsamples = len(ch_mult) - 1
  if size % (2 ** downsamples):
    fail('data.image_size', size,
          f'must be divisible by 2**{downsamples} for a U-Net with ch_mult={ch_mult}')
  resolutions = {size // 2 ** level for level in range(len(ch_mult))}
  if not _is_sequence(config.model.attn_resolutions):
    fail('model.attn_resolutions', config.model.attn_resolutions,
          'must be a tuple of feature-map sizes, e.g. (16, 8)')
  for res in config.model.attn_resolutions:
    if res not in resolutions:
      fail('model.attn_resolutions', tuple(config.model.attn_resolutions),
            f'{res} is not a feature-map size of this U-Net (sizes: {sorted(resolutions)})')

  _positive(config, 'diffusion.num_timesteps', integer=True)
  _choice(config, 'diffusion.schedule', SCHEDULES)
  validate_network_shape(config)


def validate_adversarial(config: ml_collections.ConfigDict) -> None:
  _choice(config, 'adv.method', ADV_METHODS)
  _choice(config, 'adv.norm', ADV_NORMS)
  _choice(config, 'adv.radius_scale', ADV_SCALES)
  # Absent from runs made before they existed (absolute, constant, auto).
  if 'step_size_scale' in config.adv:
    _choice(config, 'adv.step_size_scale', ADV_SCALES)
  if 'radius_schedule' in config.adv:
    _choice(config, 'adv.radius_schedule', ADV_RADIUS_SCHEDULES)
  if 'replay_loop' in config.adv:
    _choice(config, 'adv.replay_loop', ADV_REPLAY_LOOPS)
  _choice(config, 'adv.init', ADV_INITS)
  _choice(config, 'adv.target', ADV_TARGETS)
  _positive(config, 'adv.steps', integer=True)
  _positive(config, 'adv.step_size', allow_zero=True)
  _positive(config, 'adv.radius', allow_zero=True)
  t_range = config.adv.t_range
  num_timesteps = config.diffusion.num_timesteps
  if not _is_sequence(t_range) or len(t_range) != 2 or not all(
      is_number(t) and int(t) == t for t in t_range):
    fail('adv.t_range', t_range, 'must be a pair (t_min, t_max)')
  t_min, t_max = t_range
  t_max = num_timesteps - 1 if t_max == -1 else t_max
  if not 0 <= t_min <= t_max < num_timesteps:
    fail('adv.t_range', t_range,
          f'must satisfy 0 <= t_min <= t_max < num_timesteps={num_timesteps} (t_max=-1: last)')
  _positive(config, 'input_perturbation.gamma', allow_zero=True)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of one image of the run."""
  return (int(config.data.image_size), int(config.data.image_size), int(config.data.channels))


def perturbed_t_range(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """config.adv.t_range with t_max = -1 replaced by the last timestep."""
  t_min, t_max = config.adv.t_range
  return int(t_min), int(config.diffusion.num_timesteps - 1 if t_max == -1 else t_max)


def updates_per_minibatch(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates made on one minibatch (free AT: one per pass)."""
  return int(config.adv.steps) if config.adv.method == 'free' else 1


def minibatches_per_call(config: ml_collections.ConfigDict) -> int:
  """Minibatches one compiled train call runs (1 for runs made before the field)."""
  return int(config.training.get('minibatches_per_call', 1))


def objective_of(config: ml_collections.ConfigDict) -> str:
  """config.objective; 'dpm' for runs made before objectives had a name."""
  return config.get('objective', 'dpm')


def is_consistency(config: ml_collections.ConfigDict) -> bool:
  """Whether the run trains a consistency model (objective cd or ct)."""
  return objective_of(config) in ('cd', 'ct')


def validate_consistency(config: ml_collections.ConfigDict) -> None:
  """The consistency block (objective cd | ct); the teacher's run is checked when loaded."""
  from atdiff_jax.diffusion.schedules import get_beta_schedule  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if 'consistency' not in config:
    raise ConfigError('config.consistency is missing (objective cd and ct need it)')
  _choice(config, 'consistency.scalings', CM_SCALINGS)
  _choice(config, 'consistency.pairs', CM_PAIRS)
  _choice(config, 'consistency.grid', CM_GRIDS)
  _choice(config, 'consistency.distance', CM_DISTANCES)
  _choice(config, 'consistency.weighting', CM_WEIGHTINGS)
  _choice(config, 'consistency.teacher_solver', CM_TEACHER_SOLVERS)
  _choice(config, 'consistency.target_at', CM_TARGETS)
  for field in ('sigma_data', 'timestep_scaling', 'sigma_max', 'rho', 'p_std'):
    _positive(config, f'consistency.{field}')
  cm = config.consistency
  if not is_number(cm.p_mean):
    fail('consistency.p_mean', cm.p_mean, 'must be a finite number')
  _positive(config, 'consistency.num_points', integer=True)
  if cm.num_points < 2:
    fail('consistency.num_points', cm.num_points, 'must be >= 2 (a pair needs two times)')
  _positive(config, 'consistency.skip', integer=True)
  if cm.skip > cm.num_points - 1:
    fail('consistency.skip', cm.skip,
          f'must be at most num_points - 1 = {cm.num_points - 1}')
  _positive(config, 'consistency.n_start', integer=True)
  _positive(config, 'consistency.n_max', integer=True)
  if cm.n_max < cm.n_start:
    fail('consistency.n_max', cm.n_max, f'must be >= n_start ({cm.n_start})')
  _positive(config, 'consistency.ect_stage_updates', integer=True)
  mu = cm.target_ema
  if not is_number(mu) or not 0.0 <= mu < 1.0:
    fail('consistency.target_ema', mu, 'must be in [0, 1) (0: the target is the student)')
  num_timesteps = config.diffusion.num_timesteps
  _positive(config, 'consistency.t_min', allow_zero=True, integer=True)
  if cm.t_min >= num_timesteps - 1:
    fail('consistency.t_min', cm.t_min, f'must be below the last timestep ({num_timesteps - 1})')
  abar = np.cumprod(1.0 - get_beta_schedule(config.diffusion.schedule, num_timesteps))
  ve_sigma = np.sqrt((1.0 - abar) / abar)
  if not ve_sigma[int(cm.t_min)] < cm.sigma_max <= ve_sigma[-1]:
    fail('consistency.sigma_max', cm.sigma_max,
          f'must lie in ({ve_sigma[int(cm.t_min)]:.4g}, {ve_sigma[-1]:.4g}], the noise levels '
          f'sigma~ of timesteps t_min..{num_timesteps - 1} of this schedule')
  if objective_of(config) == 'cd' and not config.get('teacher', ''):
    raise ConfigError("config.teacher='': consistency distillation needs a teacher: "
                      'the workdir of a DPM run of this project (--config.teacher=RUN)')
  if config.input_perturbation.gamma:
    fail('input_perturbation.gamma', config.input_perturbation.gamma,
          'input perturbation (DDPM-IP) belongs to objective=dpm; set it to 0')
  if config.training.timestep_sampler != 'uniform':
    fail('training.timestep_sampler', config.training.timestep_sampler,
          'belongs to objective=dpm; consistency pairs come from config.consistency.pairs')


def validate_training(config: ml_collections.ConfigDict, num_devices: int,
                      num_processes: int = 1) -> None:
  """Everything a training run needs; `num_devices` is the global device count."""
  _positive(config, 'seed', allow_zero=True, integer=True)
  validate_model(config)
  if objective_of(config) not in OBJECTIVES:
    fail('objective', objective_of(config), f'must be one of {", ".join(OBJECTIVES)}')
  validate_adversarial(config)
  if is_consistency(config):
    validate_consistency(config)
  batch = config.training.batch_size
  _positive(config, 'training.batch_size', integer=True)
  if batch % num_devices:
    fail('training.batch_size', batch,
          f'must be divisible by the number of devices ({num_devices})')
  if batch % num_processes:
    fail('training.batch_size', batch,
          f'must be divisible by the number of processes ({num_processes})')
  _positive(config, 'training.num_steps', integer=True)
  _positive(config, 'training.lr')
  _positive(config, 'training.warmup_steps', allow_zero=True, integer=True)
  _positive(config, 'training.weight_decay', allow_zero=True)
  _positive(config, 'training.grad_clip', allow_zero=True)
  rates = config.training.ema_rates
  if (not _is_sequence(rates) or not rates
      or any(not is_number(r) or not 0.0 <= r < 1.0 for r in rates)):
    fail('training.ema_rates', rates, 'must be a non-empty tuple of rates in [0, 1)')
  _choice(config, 'training.timestep_sampler', TIMESTEP_SAMPLERS)
  for field in ('log_every', 'checkpoint_every'):
    _positive(config, f'training.{field}', integer=True)
  _positive(config, 'training.keep_checkpoints', integer=True)
  _positive(config, 'training.stop_after_nonfinite', allow_zero=True, integer=True)
  _positive(config, 'training.max_update_ratio', allow_zero=True)
  profile = config.training.get('profile', (0, 0))  # absent from older runs
  if (not _is_sequence(profile) or len(profile) != 2
      or any(not is_number(v) or int(v) != v or v < 0 for v in profile)):
    fail('training.profile', profile, 'must be (first minibatch, count), whole numbers >= 0')
  if 'minibatches_per_call' in config.training:
    _positive(config, 'training.minibatches_per_call', integer=True)
  _positive(config, 'training.sample_every', allow_zero=True, integer=True)
  _positive(config, 'training.num_samples', integer=True)
  _positive(config, 'training.sample_steps', integer=True)
  if config.training.sample_steps > config.diffusion.num_timesteps:
    fail('training.sample_steps', config.training.sample_steps,
          f'must be <= diffusion.num_timesteps ({config.diffusion.num_timesteps})')
  validate_cross_fields(config)
  if 'eval' in config:
    validate_eval_choices(config)


def validate_source(config: ml_collections.ConfigDict, source) -> None:
  """What the model expects of the data that `data.create_source` cannot know alone."""
  num_classes = config.model.num_classes
  if num_classes and source.num_classes == 0:
    fail('model.num_classes', num_classes,
          f'the data ({config.data.name}) has no labels; set model.num_classes=0')
  if num_classes and source.num_classes > num_classes:
    fail('model.num_classes', num_classes,
          f'the data ({config.data.name}) has {source.num_classes} classes')
  if len(source) < config.training.batch_size:
    fail('training.batch_size', config.training.batch_size,
          f'is larger than the dataset ({len(source)} images)')


# ------------------------------------------------------------------ cross-field checks
# Checks that relate fields to each other or to what the code can run, kept apart from the
# per-field checks above.

# Seeds go to jax.random.key and NumPy, and step or batch indices are added to them.
SEED_LIMIT = 2 ** 32
# The most passes (free AT's K, PGD's ascent steps) that an unrolled step compiles: it holds
# one copy of the forward/backward per pass, so K = 10000 would compile for hours. Above it
# adv.replay_loop='auto' rolls the loop, and 'unrolled' is an error.
MAX_UNROLLED_PASSES = 16
FILE_SOURCES = ('npz', 'folder')  # data.name values that read data.path
BUILTIN_SOURCES = ('digits',) + FILE_SOURCES  # the others are TFDS names


def check_seed(field: str, value: Any) -> None:
  """A seed JAX and NumPy take, with room for the indices added to it."""
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
    fail(field, value, 'must be an integer in [0, 2**32)')


def validate_network_shape(config: ml_collections.ConfigDict) -> None:
  """Attention heads that split every attention block's channels, and a diffusion long
  enough to have a posterior (what the U-Net and the schedules would raise mid-trace)."""
  model = config.model
  if config.diffusion.num_timesteps < 2:
    fail('diffusion.num_timesteps', config.diffusion.num_timesteps,
          'must be >= 2 (a diffusion needs at least two noise levels)')
  size, ch_mult = config.data.image_size, tuple(model.ch_mult)
  levels = [level for level in range(len(ch_mult))
            if size // 2 ** level in tuple(model.attn_resolutions)]
  encoder = set(levels) | {len(ch_mult) - 1}  # the middle block always has attention
  head_channels = model.num_head_channels
  up_heads = model_field(model, 'num_heads_upsample')
  up_heads = model.num_heads if up_heads == -1 else up_heads
  for level in sorted(encoder):
    channels = model.ch * ch_mult[level]
    if head_channels != -1:
      if channels % head_channels:
        fail('model.num_head_channels', head_channels,
              f'must divide the {channels} channels of the attention at '
              f'{size // 2 ** level}x{size // 2 ** level}')
      continue
    for field, heads, where in (('num_heads', model.num_heads, encoder),
                                ('num_heads_upsample', up_heads, set(levels))):
      if level in where and channels % heads:
        fail(f'model.{field}', heads, f'must divide the {channels} channels of the attention '
              f'at {size // 2 ** level}x{size // 2 ** level} (or set model.num_head_channels)')


def replay_passes(config: ml_collections.ConfigDict) -> int:
  """The passes of one minibatch's replay loop: free AT's K, PGD's ascent steps, else 1."""
  return int(config.adv.steps) if config.adv.method in ('free', 'pgd') else 1


def validate_cross_fields(config: ml_collections.ConfigDict) -> None:
  """Seeds, the replay loop's length, and fields that another field makes unused (a value
  the run would silently ignore)."""
  check_seed('seed', config.seed)
  if 'eval' in config:
    check_seed('eval.seed', config.eval.seed)
  if config.adv.get('replay_loop') == 'unrolled' and replay_passes(config) > MAX_UNROLLED_PASSES:
    fail('adv.replay_loop', 'unrolled',
          f'compiles one copy of the forward/backward per pass, and adv.steps='
          f'{config.adv.steps} is more than {MAX_UNROLLED_PASSES}; use rolled or auto')
  data = config.data
  ignored = [('path', bool(data.get('path')) and data.name not in FILE_SOURCES,
              f'is read only when data.name is {" or ".join(FILE_SOURCES)}'),
             ('tfds_data_dir', bool(data.get('tfds_data_dir')) and data.name in BUILTIN_SOURCES,
              'is read only for TFDS data sets'),
             ('split', data.get('split', 'train') != 'train' and data.name in BUILTIN_SOURCES,
              'is read only for TFDS data sets'),
             ('skip_unreadable', bool(data.get('skip_unreadable')) and data.name != 'folder',
              "is read only when data.name is 'folder'")]
  for field, unused, why in ignored:
    if unused:
      fail(f'data.{field}', data[field], f'{why} (data.name={data.name!r})')
  if config.get('teacher') and objective_of(config) != 'cd':
    fail('teacher', config.teacher,
          f'is read only by objective=cd (objective={objective_of(config)!r}); to start '
          'from its weights use config.init_from')


def validate_eval_choices(config: ml_collections.ConfigDict) -> None:
  """The eval block's samplers, their options and epsilon scales: what a later
  --mode=sample|eval|probe reads from the run's config.json, so training checks them too."""
  # pylint: disable=g-import-not-at-top
  from atdiff_jax.diffusion.schedules import get_beta_schedule
  from atdiff_jax.samplers import options
  ev = config.eval
  for field, names in (('sampler', (ev.sampler,)), ('samplers', tuple(ev.samplers))):
    for name in names:
      if name not in options.OPTIONS:
        fail(f'eval.{field}', name, f'must be one of {", ".join(options.OPTIONS)}')
  for field, values in (('eps_scale', (ev.eps_scale,)), ('eps_scales', tuple(ev.eps_scales))):
    for value in values:
      if not is_number(value) or value <= 0:
        fail(f'eval.{field}', value, 'must be a finite number > 0 (1 = no epsilon scaling)')
  options.check_config_options(ev, get_beta_schedule(config.diffusion.schedule,
                                                     config.diffusion.num_timesteps))


RUN_BLOCKS = ('model', 'data', 'diffusion', 'training')


def check_run_config(raw: Any, path: str) -> ml_collections.ConfigDict:
  """The parsed config.json `raw` of a run as a ConfigDict, or ConfigError saying what
  about the file `path` is wrong (not a run config, or one that builds no network)."""
  if not isinstance(raw, dict):
    raise ConfigError(f'{path}: not a run config (a JSON {type(raw).__name__}, not an object)')
  missing = [b for b in RUN_BLOCKS if not isinstance(raw.get(b), dict)]
  if missing:
    raise ConfigError(f'{path}: not a run config (no {", ".join(missing)} block)')
  config = ml_collections.ConfigDict(raw)
  try:
    validate_model(config)
    rates = config.training.ema_rates
    if not _is_sequence(rates) or not rates:
      fail('training.ema_rates', rates, 'must be a non-empty list')
  except (ConfigError, KeyError, AttributeError, TypeError) as e:
    raise ConfigError(f'{path}: not a usable run config: {e}') from None
  return config
