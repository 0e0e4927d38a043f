"""Multistep DPM-Solver++ (Lu et al. 2022) for discrete-time eps-prediction models.

The discrete process is read as a continuous one as in DPM-Solver's 'discrete' noise
schedule: log alpha(t) (alpha = sqrt(abar)) is piecewise linear through the points
t_n = (n + 1) / T, n = 0..T-1, extrapolated linearly outside them, and the model is called at
the original-scale time t * T - 1 (DPM-Solver's (t - 1/T) * 1000 for T = 1000).

Every update is linear in x and in the stored x0 predictions, so all coefficients are
computed once on the host in float64, and the scan only forms weighted sums.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from atdiff_jax.samplers import common

SKIP_TYPES = ('logSNR', 'time_uniform', 'time_quadratic')
SOLVER_TYPES = ('dpmsolver', 'taylor')
# As in the reference solver: with fewer steps than this, the last steps use lower orders.
LOWER_ORDER_FINAL_BELOW = 10


def _interp_linear_extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
  """Piecewise-linear interpolation (xp increasing), extended linearly past both ends."""
  x = np.asarray(x, dtype=np.float64)
  y = np.interp(x, xp, fp)
  left_slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
  right_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
  y = np.where(x < xp[0], fp[0] + (x - xp[0]) * left_slope, y)
  return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * right_slope, y)


class DiscreteVPSchedule:
  """Continuous-time view of a discrete beta schedule (float64, host side)."""

  def __init__(self, betas):
    betas = common.as_betas(betas)
    self.num_timesteps = int(betas.shape[0])
    self.t_grid = np.arange(1, self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps
    self.log_alpha_grid = 0.5 * np.cumsum(np.log1p(-betas))
    if not np.all(np.diff(self.log_alpha_grid) < 0):
      raise ValueError('DPM-Solver needs strictly increasing noise; some beta is 0 or 1.')

  def log_alpha(self, t) -> np.ndarray:
    return _interp_linear_extrapolate(t, self.t_grid, self.log_alpha_grid)

  def alpha(self, t) -> np.ndarray:
    return np.exp(self.log_alpha(t))

  def sigma(self, t) -> np.ndarray:
    return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

  def log_snr_half(self, t) -> np.ndarray:
    """lambda(t) = log(alpha / sigma)."""
    log_alpha = self.log_alpha(t)
    return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

  def inverse_log_snr_half(self, lam) -> np.ndarray:
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, np.float64))
    return _interp_linear_extrapolate(log_alpha, self.log_alpha_grid[::-1], self.t_grid[::-1])

  def model_time(self, t) -> np.ndarray:
    """The original-scale timestep the model sees at continuous time t."""
    return np.asarray(t, np.float64) * self.num_timesteps - 1.0


def time_range(schedule: DiscreteVPSchedule, t_start: float | None = None,
               t_end: float | None = None) -> tuple[float, float]:
  """(t_start, t_end), empty ones at their defaults 1 and 1/T; ValueError when the
  solver cannot run from one to the other on this schedule."""
  default_end = 1.0 / schedule.num_timesteps
  start = 1.0 if t_start is None else float(t_start)
  end = default_end if t_end is None else float(t_end)
  if not 0.0 < end:
    raise ValueError(f't_end={end}: must be > 0')
  if not end < start:
    if t_start is None:
      raise ValueError(f't_end={end}: must be below t_start={start} (its default)')
    raise ValueError(f't_start={start}: must be above t_end={end}'
                     f'{" (its default, 1/T)" if t_end is None else ""}')
  if schedule.log_alpha(end) >= 0.0:
    raise ValueError(f't_end={end}: is below the first noise level of this schedule (the '
                     f'linear extrapolation below 1/T={default_end} reaches alpha >= 1); use '
                     'a larger t_end')
  return start, end


def time_steps(schedule: DiscreteVPSchedule, skip_type: str, t_start: float, t_end: float,
               num_steps: int) -> np.ndarray:
  """The num_steps + 1 times from t_start down to t_end."""
  if skip_type == 'logSNR':
    lams = np.linspace(schedule.log_snr_half(t_start), schedule.log_snr_half(t_end),
                       num_steps + 1)
    return schedule.inverse_log_snr_half(lams)
  if skip_type == 'time_uniform':
    return np.linspace(t_start, t_end, num_steps + 1)
  if skip_type == 'time_quadratic':
    return np.linspace(np.sqrt(t_start), np.sqrt(t_end), num_steps + 1) ** 2
  raise ValueError(f'Unknown skip_type {skip_type!r}; allowed: {", ".join(SKIP_TYPES)}.')


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """Order of each step: warm-up from 1, and lower orders at the end for few steps."""
  orders = np.minimum(order, np.arange(1, num_steps + 1))
  if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
    orders = np.minimum(orders, num_steps - np.arange(num_steps))
  return orders


def multistep_coefficients(lams: np.ndarray, alphas: np.ndarray, sigmas: np.ndarray,
                           orders: np.ndarray, order: int,
                           solver_type: str) -> tuple[np.ndarray, np.ndarray]:
  """x_{i+1} = ratio[i] * x_i + sum_k coefs[i, k] * x0_pred[i - k] (DPM-Solver++ updates)."""
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f'Unknown solver_type {solver_type!r}; allowed: {", ".join(SOLVER_TYPES)}.')
  num_steps = orders.shape[0]
  ratios = sigmas[1:] / sigmas[:-1]
  coefs = np.zeros((num_steps, order), dtype=np.float64)
  unit = np.eye(max(order, 3), dtype=np.float64)  # unit[k]: the x0 prediction k steps back
  for i in range(num_steps):
    h = lams[i + 1] - lams[i]
    a = alphas[i + 1]
    phi_1 = np.expm1(-h)
    if orders[i] == 1:
      c = -a * phi_1 * unit[0]
    elif orders[i] == 2:
      r0 = (lams[i] - lams[i - 1]) / h
      d1 = (unit[0] - unit[1]) / r0
      if solver_type == 'dpmsolver':
        c = -a * phi_1 * unit[0] - 0.5 * a * phi_1 * d1
      else:
        c = -a * phi_1 * unit[0] + a * (phi_1 / h + 1.0) * d1
    else:
      r0 = (lams[i] - lams[i - 1]) / h
      r1 = (lams[i - 1] - lams[i - 2]) / h
      d1_0 = (unit[0] - unit[1]) / r0
      d1_1 = (unit[1] - unit[2]) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi_2 = phi_1 / h + 1.0
      phi_3 = phi_2 / h - 0.5
      c = -a * phi_1 * unit[0] + a * phi_2 * d1 - a * phi_3 * d2
    coefs[i] = c[:order]
  return ratios, coefs


def sample_dpm_solver_pp(model_fn: common.ModelFn,
                         rng: jax.Array,
                         shape: Sequence[int],
                         betas,
                         num_steps: int,
                         *,
                         y: jax.Array | None = None,
                         eps_scale: float = 1.0,
                         clip_x0: bool = False,
                         order: int = 2,
                         skip_type: str = 'logSNR',
                         t_start: float | None = None,
                         t_end: float | None = None,
                         lower_order_final: bool = True,
                         solver_type: str = 'dpmsolver',
                         sharding: NamedSharding | None = None,
                         perturb_fn: common.PerturbFn | None = None,
                         return_trajectory: bool = False) -> common.SampleOutput:
  """Draws x0 samples with multistep DPM-Solver++; NFE = num_steps.

  t_start defaults to 1.0 and t_end to 1/T (the reference solver's defaults for discrete
  models; the AT paper uses 0.992 and 1e-3). `clip_x0` clips each x0 prediction to [-1, 1]
  (off by default, as in the reference solver). The learned variance output, if any, is
  ignored. `lower_order_final` drops to lower orders in the last steps when
  num_steps < 10, which stabilises very few steps.
  """
  if order not in (1, 2, 3):
    raise ValueError(f'order must be 1, 2 or 3, got {order!r}.')
  shape = common.check_shape(shape)
  y = common.check_labels(y, shape[0])
  num_steps = common.check_num_steps(num_steps)
  schedule = DiscreteVPSchedule(betas)
  t_start, t_end = time_range(schedule, t_start, t_end)
  ts = time_steps(schedule, skip_type, t_start, t_end, num_steps)
  lams = schedule.log_snr_half(ts)
  alphas, sigmas = schedule.alpha(ts), schedule.sigma(ts)
  orders = step_orders(num_steps, order, lower_order_final)
  ratios, coefs = multistep_coefficients(lams, alphas, sigmas, orders, order, solver_type)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  per_step = {
      't': f32(schedule.model_time(ts[:-1])),
      'alpha': f32(alphas[:-1]),
      'sigma': f32(sigmas[:-1]),
      'ratio': f32(ratios),
      'coefs': f32(coefs),
      'step': jnp.arange(num_steps, dtype=jnp.int32),
  }
  init_key, _ = common.split_rng(rng)
  x_init = common.normal(init_key, shape, sharding)
  history_sharding = None
  if sharding is not None:  # the history stacks predictions on a leading axis
    history_sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
  history = common.constrain(jnp.zeros((order,) + shape, jnp.float32), history_sharding)

  def step(carry, c):
    x, history = carry
    x = common.model_input(model_fn, x, y, c, rng, perturb_fn, sharding)
    eps, _ = common.call_model(model_fn, x, c['t'], y, eps_scale)
    x0 = common.maybe_clip_x0((x - c['sigma'] * eps) / c['alpha'], clip_x0)
    # Newest prediction first; the oldest falls off.
    history = jnp.concatenate([x0[None], history[:-1]], axis=0)
    history = common.constrain(history, history_sharding)
    x_next = c['ratio'] * x
    for k in range(order):  # elementwise sums: no matmul, so no reduced-precision dot
      x_next = x_next + c['coefs'][k] * history[k]
    return (common.constrain(x_next, sharding), history), (x, eps) if return_trajectory else None

  (x0, _), seen = jax.lax.scan(step, (x_init, history), per_step)
  return common.trajectory_output(x0, seen, per_step)
