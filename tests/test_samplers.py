"""Samplers against the closed-form optimal denoiser of Gaussian data (no network needed;
see gaussian_oracle)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from atdiff_jax import samplers
from atdiff_jax.samplers import common
from atdiff_jax.samplers import dpm_solver
from atdiff_jax.samplers import respace
from gaussian_oracle import ABAR, BETAS, MU, STD, T, learned_sigma_oracle, oracle_model
from gaussian_oracle import key as _key

STATS_SHAPE = (4096, 2, 2, 2)  # 16k values per channel: Monte-Carlo error ~1% of the variance
SMALL_SHAPE = (64, 2, 2, 2)


def _errors(samples):
  """(max |mean - mu|, max |var / s^2 - 1|) over channels."""
  x = np.asarray(samples, np.float64)
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  return np.abs(mean - MU).max(), np.abs(var / STD**2 - 1.0).max()


def _sample(model, name, num_steps, shape=SMALL_SHAPE, seed=0, y=None, mesh=None, **opts):
  """One configuration through `make_sample_fn` (the public entry point)."""
  opts.setdefault('clip_x0', False)
  fn = samplers.make_sample_fn(model, name, BETAS, num_steps, shape, mesh=mesh, **opts)
  return fn(_key(seed), y)


def _sample_together(runs, shape=STATS_SHAPE, seed=0, rng=None):
  """Several (model, name, num_steps, opts) runs in ONE jit (one compile: tests stay fast)."""

  def sample_all(rng):
    outs = []
    for model, name, num_steps, opts in runs:
      opts = {'clip_x0': False, **opts}
      outs.append(samplers.get_sampler(name)(model, rng, shape, BETAS, num_steps, **opts))
    return outs

  return [np.asarray(x) for x in jax.jit(sample_all)(_key(seed) if rng is None else rng)]


# --- respacing ---------------------------------------------------------------------------


def test_space_timesteps_known_cases():
  assert samplers.space_timesteps(1000, 'ddim10') == set(range(0, 1000, 100))
  assert samplers.space_timesteps(100, [10]) == set(range(0, 100, 11))
  assert samplers.space_timesteps(100, '10') == set(range(0, 100, 11))
  assert samplers.space_timesteps(10, 'ddim3') == {0, 4, 8}
  # Two sections of 50; the second uses stride 12.25, and round(24.5) == 24 (half to even).
  assert samplers.space_timesteps(100, '10,5') == {
      0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99}
  steps50 = samplers.space_timesteps(1000, '50')
  assert len(steps50) == 50 and min(steps50) == 0 and max(steps50) == 999
  assert samplers.space_timesteps(300, [10, 15, 20]) >= {0, 99, 100, 199, 200, 299}
  with pytest.raises(ValueError):
    samplers.space_timesteps(10, [11])
  with pytest.raises(ValueError):
    samplers.space_timesteps(100, 'ddim200')


def test_respaced_process_keeps_alphas_cumprod():
  process = respace.respaced_process(BETAS, 10, 'ddim')
  np.testing.assert_array_equal(process.timestep_map, np.arange(0, 100, 10))
  np.testing.assert_allclose(process.alphas_cumprod, ABAR[process.timestep_map], rtol=1e-12)
  np.testing.assert_allclose(process.posterior_variance[1:],
                             process.betas[1:] * (1 - process.alphas_cumprod_prev[1:])
                             / (1 - process.alphas_cumprod[1:]))
  full = respace.respaced_process(BETAS, T)
  np.testing.assert_allclose(full.betas, BETAS, rtol=1e-9)
  with pytest.raises(ValueError, match='num_steps'):
    respace.respaced_process(BETAS, 7, '10')


# --- registry and interface ---------------------------------------------------------------


def test_registry_and_option_errors():
  assert set(samplers.SAMPLERS) == {'ancestral', 'ddim', 'dpm_solver++', 'consistency'}
  assert samplers.get_sampler('ddim') is samplers.sample_ddim
  with pytest.raises(ValueError, match="ancestral, ddim, dpm_solver\\+\\+"):
    samplers.get_sampler('heun')
  with pytest.raises(TypeError, match='ddim'):
    samplers.make_sample_fn(oracle_model, 'ddim', BETAS, 5, SMALL_SHAPE, order=2)
  with pytest.raises(ValueError, match='divisible'):
    samplers.make_sample_fn(oracle_model, 'ddim', BETAS, 5, (4, 2, 2, 2),
                            mesh=Mesh(np.array(jax.devices()), ('data',)))
  bad_channels = lambda x, t, y: jnp.concatenate([x, x, x], axis=-1)
  with pytest.raises(ValueError, match='channels'):
    _sample(bad_channels, 'ancestral', 3, shape=SMALL_SHAPE)


# --- statistics of samples ------------------------------------------------------------------


_STATS_CONFIGS = [('ancestral', {}, 5, 100), ('ddim', {}, 5, 100),
                  ('dpm_solver++', {'t_start': 0.992, 't_end': 0.015}, 5, 20)]


@pytest.fixture(scope='module')
def statistics_samples():
  """Samples for the statistics tests, all from one compile: {(name, num_steps): samples}."""
  runs = [(oracle_model, name, n, opts) for name, opts, few, many in _STATS_CONFIGS
          for n in (few, many)]
  runs.append((learned_sigma_oracle(5), 'ancestral', 5, {}))
  keys = [(name, n) for name, _, few, many in _STATS_CONFIGS for n in (few, many)]
  keys.append(('ancestral_learned_sigma', 5))
  return dict(zip(keys, _sample_together(runs)))


def test_samples_approach_data_statistics(statistics_samples):
  for name, _, few, many in _STATS_CONFIGS:
    mean_few, var_few = _errors(statistics_samples[name, few])
    mean_many, var_many = _errors(statistics_samples[name, many])
    assert var_many < var_few, (name, var_few, var_many)
    assert var_many < 0.08 and mean_many < 0.02, (name, mean_many, var_many)


def test_learned_sigma_ancestral_is_exact_for_gaussian_data(statistics_samples):
  # Five steps with a fixed variance are far off; with the exact learned variance they are not.
  _, var_fixed = _errors(statistics_samples['ancestral', 5])
  mean_err, var_err = _errors(statistics_samples['ancestral_learned_sigma', 5])
  assert mean_err < 0.02 and var_err < 0.04, (mean_err, var_err)
  assert var_fixed > 0.5


def test_ddim_eta1_equals_ancestral_with_posterior_variance():
  # DDIM must ignore a learned-variance half of the output.
  with_variance = lambda x, t, y: jnp.concatenate([oracle_model(x, t, y), 0.7 + 0 * x], -1)
  ancestral = {'clip_x0': True, 'fixed_variance': 'small'}
  ddim = {'clip_x0': True, 'eta': 1.0}
  runs = []
  for num_steps, respacing in [(T, None), (10, 'ddim')]:  # full steps, and respaced
    runs.append((oracle_model, 'ancestral', num_steps, {**ancestral, 'respacing': respacing}))
    runs.append((with_variance, 'ddim', num_steps, {**ddim, 'respacing': respacing}))
  samples = _sample_together(runs, shape=SMALL_SHAPE)
  np.testing.assert_allclose(samples[1], samples[0], atol=2e-5)
  np.testing.assert_allclose(samples[3], samples[2], atol=2e-5)
  assert np.abs(samples[2] - samples[0]).max() > 1e-2  # the two cases differ


def _reference_dpm_solver_pp(x, ts, order, lower_order_final, schedule):
  """DPM-Solver++ multistep written step by step (float64), to check the folded coefficients."""
  mu, s2 = MU, STD**2

  def data_prediction(x, t):
    a = schedule.alpha(t)**2
    eps = np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * s2 + 1 - a)
    return (x - schedule.sigma(t) * eps) / schedule.alpha(t)

  lam = schedule.log_snr_half
  steps = len(ts) - 1
  preds, times = [data_prediction(x, ts[0])], [ts[0]]
  for step in range(1, steps + 1):
    if step < order:
      step_order = step
    elif lower_order_final and steps < 10:
      step_order = min(order, steps + 1 - step)
    else:
      step_order = order
    t = ts[step]
    h = lam(t) - lam(times[-1])
    phi_1 = np.expm1(-h)
    x_next = (schedule.sigma(t) / schedule.sigma(times[-1]) * x
              - schedule.alpha(t) * phi_1 * preds[-1])
    if step_order >= 2:
      r0 = (lam(times[-1]) - lam(times[-2])) / h
      d1_0 = (preds[-1] - preds[-2]) / r0
    if step_order == 2:
      x_next = x_next - 0.5 * schedule.alpha(t) * phi_1 * d1_0
    elif step_order == 3:
      r1 = (lam(times[-2]) - lam(times[-3])) / h
      d1_1 = (preds[-2] - preds[-3]) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi_2 = phi_1 / h + 1
      x_next = x_next + schedule.alpha(t) * (phi_2 * d1 - (phi_2 / h - 0.5) * d2)
    x = x_next
    if step < steps:
      preds.append(data_prediction(x, t))
      times.append(t)
  return x


def test_dpm_solver_matches_stepwise_reference():
  num_steps, seed = 7, 3
  all_opts = [{'order': 2},
              {'order': 3, 'skip_type': 'time_quadratic', 't_start': 0.992, 't_end': 0.005}]
  samples = _sample_together([(oracle_model, 'dpm_solver++', num_steps, o) for o in all_opts],
                             shape=SMALL_SHAPE, seed=seed)
  schedule = dpm_solver.DiscreteVPSchedule(BETAS)
  init_key, _ = common.split_rng(_key(seed))
  x_init = np.asarray(common.normal(init_key, SMALL_SHAPE, None), np.float64)
  for opts, got in zip(all_opts, samples):
    ts = dpm_solver.time_steps(schedule, opts.get('skip_type', 'logSNR'),
                               opts.get('t_start', 1.0), opts.get('t_end', 1.0 / T), num_steps)
    expected = _reference_dpm_solver_pp(x_init, ts, opts['order'], True, schedule)
    np.testing.assert_allclose(got, expected, atol=2e-4, err_msg=str(opts))


def test_dpm_solver_schedule_and_step_orders():
  schedule = dpm_solver.DiscreteVPSchedule(BETAS)
  grid = np.arange(1, T + 1) / T
  np.testing.assert_allclose(schedule.alpha(grid), np.sqrt(ABAR), rtol=1e-12)
  np.testing.assert_allclose(schedule.model_time(grid), np.arange(T), atol=1e-9)
  ts = np.array([5e-3, 0.05, 0.5, 0.992, 1.0])  # 5e-3 < 1/T: linear extrapolation
  np.testing.assert_allclose(schedule.inverse_log_snr_half(schedule.log_snr_half(ts)), ts,
                             rtol=1e-9)
  steps = dpm_solver.time_steps(schedule, 'logSNR', 0.992, 5e-3, 6)
  assert steps[0] == pytest.approx(0.992) and steps[-1] == pytest.approx(5e-3)
  np.testing.assert_allclose(np.diff(schedule.log_snr_half(steps)),
                             np.diff(schedule.log_snr_half(steps))[0], rtol=1e-9)
  assert dpm_solver.step_orders(5, 2, True).tolist() == [1, 2, 2, 2, 1]
  assert dpm_solver.step_orders(5, 3, True).tolist() == [1, 2, 3, 2, 1]
  assert dpm_solver.step_orders(5, 3, False).tolist() == [1, 2, 3, 3, 3]
  assert dpm_solver.step_orders(12, 2, True).tolist() == [1] + [2] * 11
  assert dpm_solver.step_orders(1, 2, True).tolist() == [1]
  with pytest.raises(ValueError, match='skip_type'):
    dpm_solver.time_steps(schedule, 'edm', 1.0, 0.01, 5)
  # Extrapolating this cosine schedule to 1e-3 (the paper's value for T = 1000) gives alpha > 1.
  with pytest.raises(ValueError, match='t_end'):
    _sample(oracle_model, 'dpm_solver++', 5, t_end=1e-3)


# --- epsilon scaling -----------------------------------------------------------------------


def test_eps_scaling():
  eps = jnp.ones((2, 2))
  assert common.scale_eps(eps, 1.0) is eps  # lambda = 1 is exactly a no-op
  model = learned_sigma_oracle(5)

  def divided(x, t, y):  # eps / 1.2 by hand; the variance half is left alone
    out = model(x, t, y)
    return jnp.concatenate([out[..., :2] / 1.2, out[..., 2:]], axis=-1)

  plain, scaled, by_hand = _sample_together([
      (model, 'ancestral', 5, {'eps_scale': 1.0}),
      (model, 'ancestral', 5, {'eps_scale': 1.2}),
      (divided, 'ancestral', 5, {})], shape=SMALL_SHAPE)
  assert np.abs(scaled - plain).max() > 1e-2
  np.testing.assert_allclose(scaled, by_hand, atol=1e-5)


# --- sharding and model calls ----------------------------------------------------------------


@pytest.mark.parametrize('name, opts, explicit', [
    ('ancestral', {}, False),
    ('dpm_solver++', {'order': 3}, True),
    ('consistency', {}, False),
])
def test_sharded_sampling_equals_single_device(name, opts, explicit):
  devices = jax.devices()
  assert len(devices) == 8
  if explicit:
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  else:
    mesh = Mesh(np.array(devices), ('data',))
  y = jnp.arange(SMALL_SHAPE[0], dtype=jnp.int32) % 3
  # Extra model arguments (here a shift of eps) are inputs of the compiled function.
  model = lambda x, t, labels, shift: oracle_model(x, t, labels) + shift
  single_fn, sharded_fn = (
      samplers.make_sample_fn(model, name, BETAS, 6, SMALL_SHAPE, mesh=m, clip_x0=False, **opts)
      for m in (None, mesh))
  rng, shift = jax.random.key(0), jnp.float32(0.0)
  sharded = sharded_fn(rng, y, shift)
  assert sharded.sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(sharded.addressable_shards) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single_fn(rng, y, shift)),
                             rtol=0, atol=1e-6)
  # Labels and model arguments reach the model: change either, and the samples change.
  for other in (sharded_fn(rng, (y + 1) % 3, shift), sharded_fn(rng, y, shift + 0.1)):
    assert np.abs(np.asarray(other) - np.asarray(sharded)).max() > 1e-2


def test_one_model_call_per_step_at_original_timesteps():
  seen = {'ancestral': [], 'dpm_solver++': []}

  def recording(name):
    def model(x, t, y):
      jax.debug.callback(lambda t: seen[name].append(np.asarray(t).copy()), t, ordered=True)
      return oracle_model(x, t, y)
    return model

  _sample_together([(recording('ancestral'), 'ancestral', 10, {'respacing': 'ddim'}),
                    (recording('dpm_solver++'), 'dpm_solver++', 6,
                     {'t_start': 0.992, 't_end': 0.015})], shape=(8, 2, 2, 2))
  jax.effects_barrier()
  for name, num_steps in [('ancestral', 10), ('dpm_solver++', 6)]:
    assert len(seen[name]) == num_steps, name  # NFE = num_steps
    assert all(s.shape == (8,) and s.dtype == np.float32 and np.all(s == s[0])
               for s in seen[name])
  np.testing.assert_array_equal([s[0] for s in seen['ancestral']], range(90, -1, -10))
  times = np.array([s[0] for s in seen['dpm_solver++']])
  # Continuous time t maps to t * T - 1 on the original scale.
  assert times[0] == pytest.approx(0.992 * T - 1, abs=1e-4)
  assert np.all(np.diff(times) < 0) and times[-1] > 0.015 * T - 1
  # Evenly spaced respacing: ADM's space_timesteps(T, [4]).
  assert sorted(respace.resolve_respacing(T, 4, None).tolist()) == [0, 33, 66, 99]


# --- consistency sampling ------------------------------------------------------------------


def _exact_consistency_model(t_min=0.0):
  """The eps model whose x0 prediction is f*(x, t) = m_min + sqrt(v_min / v_t)(x - m_t), the
  exact consistency function of the Gaussian data with boundary t_min (f*(x, t) = x at t <=
  t_min: it lands on x_{t_min}); also the moments (m_min, v_min) of that marginal."""
  from atdiff_jax.diffusion.consistency_function import eps_of_consistency  # pylint: disable=g-import-not-at-top
  from atdiff_jax.diffusion.vp_time import VPTime, broadcast_to  # pylint: disable=g-import-not-at-top
  vp = VPTime.create(BETAS)

  def moments(t):
    a2 = broadcast_to(vp.alpha(t), 4)**2
    return jnp.sqrt(a2) * MU, a2 * STD**2 + 1.0 - a2

  def model(x, t, y):
    (m_min, v_min), (mt, vt) = moments(jnp.full_like(t, t_min)), moments(t)
    f = m_min + jnp.sqrt(v_min / vt) * (x - mt)
    return eps_of_consistency(vp, x, t, jnp.where(broadcast_to(t <= t_min, 4), x, f))

  return model, moments(jnp.full((1,), t_min))


def test_consistency_sampling_with_the_exact_function_reproduces_the_data():
  model, (m0, v0) = _exact_consistency_model()
  outs = _sample_together([(model, 'consistency', n, {}) for n in (1, 2, 4)])
  for n, x in zip((1, 2, 4), outs):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(mean, np.ravel(m0), atol=0.02, err_msg=f'{n} steps')
    np.testing.assert_allclose(var, np.ravel(v0), rtol=0.04, err_msg=f'{n} steps')


def test_consistency_sampling_above_t_min_lands_on_the_t_min_marginal():
  # 512k values per channel pin the variance to ~0.2%: re-noising from alpha(0) instead of
  # alpha(t_min), or steps at or below t_min, put it off by 1.3% (t_min = 30, 2 steps) up
  # to 50% (4 steps). Threefry draws arrays this large ~6x faster than rbg on CPU.
  runs, expected = [], []
  for t_min in (10.0, 30.0):
    model, moments = _exact_consistency_model(t_min)
    for n in (1, 2, 4):
      runs.append((model, 'consistency', n, {'t_min': t_min}))
      expected.append((t_min, n, moments))
  outs = _sample_together(runs, shape=(131072, 2, 2, 2), rng=jax.random.key(0))
  for (t_min, n, (m_min, v_min)), x in zip(expected, outs):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    where = f't_min={t_min:g}, {n} steps'
    np.testing.assert_allclose(mean, np.ravel(m_min), atol=0.01, err_msg=where)
    np.testing.assert_allclose(var, np.ravel(v_min), rtol=0.008, err_msg=where)


def test_consistency_sampler_times():
  seen = []

  def model(x, t, y):
    jax.debug.callback(lambda t: seen.append(float(np.asarray(t)[0])), t, ordered=True)
    return oracle_model(x, t, y)

  _sample(model, 'consistency', 3, shape=(8, 2, 2, 2))
  _sample(model, 'consistency', 2, shape=(8, 2, 2, 2), timesteps=(90.0, 40.5))
  jax.effects_barrier()
  from atdiff_jax.diffusion.vp_time import VPTime  # pylint: disable=g-import-not-at-top
  vp = VPTime.create(BETAS)
  assert seen[0] == pytest.approx(float(vp.time_of_ve_sigma(80.0)), abs=1e-3)
  assert seen[0] > seen[1] > seen[2] > 0
  assert seen[3:] == [90.0, 40.5]
  with pytest.raises(ValueError, match='decrease'):
    _sample(model, 'consistency', 2, shape=(8, 2, 2, 2), timesteps=(40.0, 90.0))


def test_consistency_times_lie_above_t_min():
  from atdiff_jax.diffusion.vp_time import VPTime  # pylint: disable=g-import-not-at-top
  from atdiff_jax.samplers import consistency  # pylint: disable=g-import-not-at-top
  vp = VPTime.create(BETAS)
  sigma_top = float(vp.ve_sigma(T - 1.0))
  for t_min in (0.0, 30.0, T - 2.0):
    for num_steps in (1, 4, T):
      times = consistency.default_timesteps(vp, num_steps, sigma_top, t_min)
      assert times.shape == (num_steps,) and times[-1] > t_min and np.all(np.diff(times) < 0)
  # At or below t_min, f is the identity: a step there would return its noisy input.
  for times in ((90.0, 30.0), (90.0, 12.0)):
    with pytest.raises(ValueError, match=r'\(t_min=30, 99\]'):
      _sample(oracle_model, 'consistency', 2, shape=(8, 2, 2, 2), t_min=30.0, timesteps=times)
  sigma_min = float(vp.ve_sigma(30.0))
  with pytest.raises(ValueError, match='sigma_max=.* must be above'):
    _sample(oracle_model, 'consistency', 2, shape=(8, 2, 2, 2), t_min=30.0,
            sigma_max=sigma_min)
  for t_min in (-1.0, T - 1.0):
    with pytest.raises(ValueError, match='t_min must lie in'):
      _sample(oracle_model, 'consistency', 2, shape=(8, 2, 2, 2), t_min=t_min)
