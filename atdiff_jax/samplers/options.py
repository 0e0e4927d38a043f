"""The options a user may give each sampler, checked before anything is traced.

`check_options(name, options)` raises ValueError('<option>=<value>: <what is allowed>') for
an unknown option or a value the sampler cannot use, so that a config error costs no
compile and no traceback from inside a traced sampler.
"""
from __future__ import annotations

from typing import Any, Callable

from atdiff_jax.config import ConfigError
from atdiff_jax.config import is_number as _number
from atdiff_jax.samplers import dpm_solver


def _bool(value) -> str | None:
  return None if isinstance(value, bool) else 'must be true or false'


def _non_negative(value) -> str | None:
  return None if _number(value) and value >= 0 else 'must be a finite number >= 0'


def _positive(value) -> str | None:
  return None if _number(value) and value > 0 else 'must be a finite number > 0'


def _one_of(*allowed) -> Callable[[Any], str | None]:
  return lambda value: None if value in allowed else (
      f'must be one of {", ".join(map(str, allowed))}')


def _unit_time(value) -> str | None:
  return None if value is None or (_number(value) and 0 < value <= 1) else (
      'must be a time in (0, 1], or empty for the default')


def _respacing(value) -> str | None:
  if value is None or isinstance(value, str):
    return None
  if isinstance(value, (tuple, list)) and all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
    return None
  return "must be a spacing such as 'ddim10' or '10,5', or a list of positive integers"


def _timesteps(value) -> str | None:
  if isinstance(value, (tuple, list)) and all(_number(v) for v in value):
    return None
  return 'must be a list of original-scale timesteps (empty: the default)'


OPTIONS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    'ancestral': {'clip_x0': _bool, 'respacing': _respacing,
                  'fixed_variance': _one_of('large', 'small')},
    'ddim': {'clip_x0': _bool, 'eta': _non_negative, 'respacing': _respacing},
    'dpm_solver++': {'clip_x0': _bool, 'order': _one_of(1, 2, 3),
                     'skip_type': _one_of(*dpm_solver.SKIP_TYPES), 't_start': _unit_time,
                     't_end': _unit_time, 'lower_order_final': _bool,
                     'solver_type': _one_of(*dpm_solver.SOLVER_TYPES)},
    'consistency': {'clip_x0': _bool, 'sigma_max': _positive, 'timesteps': _timesteps},
}


def check_options(sampler: str, options: dict[str, Any]) -> None:
  """Raises ValueError naming the first option of `sampler` that cannot work."""
  allowed = OPTIONS[sampler]
  for name, value in options.items():
    if name not in allowed:
      raise ValueError(f'{name}={value!r}: not an option of the {sampler} sampler; its '
                       f'options: {", ".join(allowed)}')
    problem = allowed[name](value)
    if problem:
      raise ValueError(f'{name}={value!r}: {problem}')
  t_start, t_end = options.get('t_start'), options.get('t_end')
  if t_start is not None and t_end is not None and not t_end < t_start:
    raise ValueError(f't_end={t_end!r}: must be below t_start={t_start!r}')


def check_config_options(eval_config, betas=None) -> None:
  """Every block of `config.eval.sampler_options`; raises ConfigError naming
  'config.eval.sampler_options.<sampler key>.<option>=<value>: ...' (the key of
  'dpm_solver++' is 'dpm_solver_pp'). With the run's `betas`, DPM-Solver++'s time range is
  checked on its schedule too (empty ends take their defaults)."""
  blocks = eval_config.get('sampler_options') or {}
  names = {name.replace('++', '_pp'): name for name in OPTIONS}
  where = 'config.eval.sampler_options'
  for key, options in blocks.items():
    if key not in names:
      raise ConfigError(f'{where}.{key}: not a sampler; the blocks are {", ".join(names)}')
    options = options.to_dict() if hasattr(options, 'to_dict') else dict(options)
    try:
      check_options(names[key], options)
      if names[key] == 'dpm_solver++' and betas is not None:
        dpm_solver.time_range(dpm_solver.DiscreteVPSchedule(betas), options.get('t_start'),
                              options.get('t_end'))
    except ValueError as e:
      raise ConfigError(f'{where}.{key}.{e}') from None
