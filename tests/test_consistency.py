"""Consistency models: the boundary condition, the CD / CT losses against NumPy, exact
fixed points on Gaussian data, and the CM train step under AT."""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import conftest
import gaussian_oracle as go
from atdiff_jax import checkpoint, train
from atdiff_jax import config as config_lib
from atdiff_jax.diffusion.consistency_function import Parametrisation
from atdiff_jax.diffusion.vp_time import VPTime, broadcast_to
from atdiff_jax.objectives import cm as cm_lib
from atdiff_jax.objectives import get_objective
from atdiff_jax.parallel import make_mesh
from atdiff_jax.train_step import TrainParts, create_train_state, make_train_step

VP = VPTime.create(go.BETAS)  # the oracle's cosine schedule, T = 100
T = go.T


def cm_config(objective='ct', channels=1, size=4, **consistency):
  config = conftest.tiny_config()
  assert config.diffusion.num_timesteps == T and config.diffusion.schedule == 'cosine'
  config.objective = objective
  config.teacher = 'a teacher run' if objective == 'cd' else ''
  config.data.image_size, config.data.channels = size, channels
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.consistency.update(consistency)
  return config


def draw(objective, images, seed=0, frozen=(), state=(), opt_step=0):
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.key(seed), i), 3))(
      jnp.arange(images.shape[0]))
  labels = jnp.zeros((images.shape[0],), jnp.int32)
  return objective.draw(state, frozen, jnp.asarray(images), labels, keys, opt_step)


# ------------------------------------------------------------------ the parametrisation


@pytest.mark.parametrize('scalings', ['lcm', 'cm'])
@pytest.mark.parametrize('t_min', [0, 3])
def test_boundary_condition_holds_bit_for_bit(scalings, t_min):
  p = Parametrisation(scalings, t_min=float(t_min))
  rng = np.random.default_rng(t_min)
  x = jnp.asarray(3 * rng.standard_normal((16, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(100 * rng.standard_normal((16, 4, 4, 3)), jnp.float32)
  at_min = jnp.full((16,), t_min, jnp.float32)
  np.testing.assert_array_equal(p(VP, x, at_min, eps), x)
  np.testing.assert_array_equal(jax.jit(lambda x, e: p(VP, x, at_min, e))(x, eps), x)
  assert not np.allclose(p(VP, x, at_min + 5.0, eps), x)


def test_lcm_scalings_leave_x_only_at_the_boundary_cm_scalings_keep_it_at_small_t():
  t = jnp.asarray([2.0, 5.0, 20.0])
  lcm_skip, lcm_out = Parametrisation('lcm').coefficients(VP, t)
  cm_skip, _ = Parametrisation('cm').coefficients(VP, t)
  assert np.all(lcm_skip < 1e-3) and np.all(lcm_out > 0.999)
  assert cm_skip[0] > 0.9  # a perturbation of x passes through at small t (see the module doc)


def test_vp_time_matches_the_discrete_process_and_inverts():
  t = jnp.arange(0, T, 7, dtype=jnp.float32)
  np.testing.assert_allclose(VP.alpha(t), np.sqrt(go.ABAR[::7]), rtol=1e-5)
  ve = VP.ve_sigma(t + 0.5)
  np.testing.assert_allclose(VP.time_of_ve_sigma(ve), t + 0.5, atol=1e-3)


# ------------------------------------------------------------------ the losses, against NumPy


class LinearEps(nn.Module):
  """eps = x W + b t / T: small enough to write in NumPy."""
  out_channels: int

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    init = nn.initializers.normal(0.5)
    w = self.param('w', init, (x.shape[-1], self.out_channels))
    b = self.param('b', init, (self.out_channels,))
    return x @ w + b * (t[:, None, None, None] / T)


def _np_schedule(t):
  log_alpha = np.interp(np.asarray(t, np.float64), np.arange(T),
                        0.5 * np.cumsum(np.log1p(-go.BETAS)))
  alpha = np.exp(log_alpha)[:, None, None, None]
  return alpha, np.sqrt(1 - alpha**2)


def _np_f(params, x, t, scalings, channels):
  w, b = (np.asarray(params[k], np.float64) for k in ('w', 'b'))
  eps = (x @ w + b * (np.asarray(t)[:, None, None, None] / T))[..., :channels]
  alpha, sigma = _np_schedule(t)
  x0 = (x - sigma * eps) / alpha
  sd2 = 0.25
  if scalings == 'lcm':
    u = 10.0 * np.asarray(t, np.float64)[:, None, None, None]
    c_skip, c_out = sd2 / (u**2 + sd2), u / np.sqrt(u**2 + sd2)
  else:
    ve = sigma / alpha
    ve_min = np.sqrt(go.BETAS[0] / (1 - go.BETAS[0]))
    c_skip, c_out = sd2 / ((ve - ve_min)**2 + sd2), (ve - ve_min) / np.sqrt(ve**2 + sd2)
  return c_skip * x + c_out * x0


def _np_heun(teacher, x, t, s, channels):
  eps = lambda x, t: (x @ np.asarray(teacher['w']) + np.asarray(teacher['b']) * (
      t[:, None, None, None] / T))[..., :channels]
  (a_t, s_t), (a_s, s_s) = _np_schedule(t), _np_schedule(s)
  gap = s_s / a_s - s_t / a_t
  d1 = eps(x, t)
  d2 = eps(a_s * (x / a_t + gap * d1), s)
  return a_s * (x / a_t + gap * (d1 + d2) / 2)


@pytest.mark.parametrize('case', ['ct_cm_huber_perturbed', 'cd_lcm_l2_clean'])
def test_losses_match_a_direct_numpy_computation(case):
  objective_name, scalings, distance, target_at = case.split('_')
  distance = {'huber': 'pseudo_huber', 'l2': 'l2'}[distance]
  channels = 2
  config = cm_config(objective_name, channels=channels, scalings=scalings, distance=distance,
                     target_at=target_at, num_points=6, weighting='inverse_gap',
                     teacher_solver='heun')
  model = LinearEps(2 * channels)
  objective = get_objective(config, model)
  x = jnp.zeros((1, 4, 4, channels))
  params = model.init(jax.random.key(1), x, jnp.zeros((1,)))['params']
  teacher = model.init(jax.random.key(2), x, jnp.zeros((1,)))['params']
  images = np.random.default_rng(0).uniform(-1, 1, (6, 4, 4, channels)).astype(np.float32)
  batch = draw(objective, images, frozen={'teacher': teacher})
  delta = 0.1 * jax.random.normal(jax.random.key(3), images.shape)
  loss, aux = objective.loss_fn(params, batch, delta, jax.random.key(4))

  # The pairs are neighbours on the Karras grid of sigma~ from sigma~(0) to 80, rho = 7.
  ve_min = np.sqrt(go.BETAS[0] / (1 - go.BETAS[0]))
  sigmas = (ve_min**(1 / 7) + np.arange(6) / 5 * (80**(1 / 7) - ve_min**(1 / 7)))**7
  t, s = np.asarray(batch['t'], np.float64), np.asarray(batch['s'], np.float64)
  ve_of = lambda u: (lambda a, sg: (sg / a)[:, 0, 0, 0])(*_np_schedule(u))
  np.testing.assert_allclose(ve_of(t), sigmas[np.searchsorted(sigmas, ve_of(t) * 0.999)],
                             rtol=1e-3)
  np.testing.assert_allclose(ve_of(s), sigmas[np.searchsorted(sigmas, ve_of(t) * 0.999) - 1],
                             rtol=1e-3)

  x0, z, d = (np.asarray(v, np.float64) for v in (images, batch['noise'], delta))
  (a_t, sig_t), (a_s, sig_s) = _np_schedule(t), _np_schedule(s)
  x_t = a_t * x0 + sig_t * z
  if objective_name == 'ct':
    x_s = a_s * x0 + sig_s * z + sig_s / sig_t * d  # target at the perturbed input
  else:
    x_s = _np_heun(teacher, x_t, t, s, channels)    # target at the clean input
  student = _np_f(params, x_t + d, t, scalings, channels)
  target = _np_f(params, x_s, s, scalings, channels)
  diff = (student - target).reshape(6, -1)
  if distance == 'l2':
    per_example = np.mean(diff**2, axis=1)
  else:
    c = 0.00054 * np.sqrt(diff.shape[1])
    per_example = np.sqrt(np.sum(diff**2, axis=1) + c**2) - c
  weights = 1.0 / (ve_of(t) - ve_of(s))
  np.testing.assert_allclose(aux['losses'], per_example, rtol=2e-4)
  np.testing.assert_allclose(loss, np.mean(weights * per_example), rtol=2e-4)


# ------------------------------------------------------------------ exact fixed points


def _moments(t):
  """m_t and v_t of x_t for the oracle's Gaussian data, shaped for (B, 1, 1, C) data."""
  alpha2 = broadcast_to(VP.alpha(t), 4)**2
  return jnp.sqrt(alpha2) * go.MU, alpha2 * go.STD**2 + 1.0 - alpha2


def exact_consistency(x, t):
  """f*(x, t) = m_0 + sqrt(v_0 / v_t) (x - m_t): the z-score is constant along the flow."""
  (m0, v0), (mt, vt) = _moments(jnp.zeros_like(t)), _moments(t)
  return m0 + jnp.sqrt(v0 / vt) * (x - mt)


def exact_flow(frozen, x, t, s, y):
  del frozen, y
  (ms, vs), (mt, vt) = _moments(s), _moments(t)
  return ms + jnp.sqrt(vs / vt) * (x - mt)


def oracle_ddim(frozen, x, t, s, y):
  del frozen, y
  return cm_lib.ddim_step(lambda x, t: go.oracle_model(x, t, None), VP, x, t, s)


class Realises(nn.Module):
  """A network whose consistency function is fn(x, t) + a x, with one param a = 0."""
  fn: Callable
  parametrisation: Parametrisation

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    f = self.fn(x, t) + self.param('a', nn.initializers.zeros, ()) * x
    c_skip, c_out = (broadcast_to(c, x.ndim) for c in self.parametrisation.coefficients(VP, t))
    alpha, sigma = broadcast_to(VP.alpha(t), x.ndim), broadcast_to(VP.sigma(t), x.ndim)
    x0 = (f - c_skip * x) / jnp.where(c_out > 0, c_out, 1.0)
    return jnp.where(c_out > 0, (x - alpha * x0) / sigma, 0.0)


def _loss_and_grad(fn, teacher_step, scalings, pairs='grid', num_points=8):
  config = cm_config('cd', channels=2, size=2, scalings=scalings, pairs=pairs,
                     num_points=num_points)
  model = Realises(fn, Parametrisation(scalings))
  objective = cm_lib.ConsistencyObjective(config, model, teacher_step=teacher_step)
  rng = np.random.default_rng(0)
  images = (go.MU + go.STD * rng.standard_normal((256, 2, 2, 2))).astype(np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(images[:1]), jnp.ones((1,)))['params']
  batch = draw(objective, images, opt_step=50_000)
  (loss, _), grad = jax.value_and_grad(objective.loss_fn, has_aux=True)(
      params, batch, None, jax.random.key(1))
  return float(loss), float(grad['a'])


@pytest.mark.parametrize('scalings', ['lcm', 'cm'])
@pytest.mark.parametrize('pairs', ['grid', 'ect'])
def test_exact_consistency_function_is_a_fixed_point_of_cd_with_the_exact_flow(scalings, pairs):
  loss, grad = _loss_and_grad(exact_consistency, exact_flow, scalings, pairs)
  assert loss < 1e-10 and abs(grad) < 1e-5, (loss, grad)  # float32 rounding
  # With a DDIM teacher f* is not the fixed point: the loss sees the solver's error.
  ddim_loss, ddim_grad = _loss_and_grad(exact_consistency, oracle_ddim, scalings, pairs)
  assert ddim_loss > 1e4 * loss and abs(ddim_grad) > 100 * abs(grad), (ddim_loss, ddim_grad)


def test_with_a_ddim_teacher_the_fixed_point_is_the_composed_ddim_map():
  config = cm_config('cd', channels=2, size=2, num_points=8)
  grid = cm_lib.ConsistencyObjective(config, Realises(exact_consistency, Parametrisation())).grid

  def composed_ddim(x, t):  # x at grid time t, taken down the grid one DDIM step at a time
    n = jnp.argmin(jnp.abs(t[:, None] - jnp.asarray(grid)[None]), axis=1)
    for j in range(len(grid) - 1, 0, -1):
      stepped = oracle_ddim((), x, jnp.full_like(t, grid[j]), jnp.full_like(t, grid[j - 1]), None)
      x = jnp.where(broadcast_to(n >= j, x.ndim), stepped, x)
    return x

  loss, grad = _loss_and_grad(composed_ddim, oracle_ddim, 'lcm')
  assert loss < 1e-10 and abs(grad) < 1e-5, (loss, grad)
  gap, gap_grad = _loss_and_grad(exact_consistency, oracle_ddim, 'lcm')
  assert gap > 1e4 * loss and abs(gap_grad) > 100 * abs(grad)


# ------------------------------------------------------------------ pairs


def test_improved_ct_curriculum_and_ect_gaps():
  # N(k) = min(10 * 2^floor(k / K'), 1280) + 1 with K' = floor(K / 8).
  ks = jnp.asarray([0, 12_499, 12_500, 50_000, 99_999])
  np.testing.assert_array_equal(cm_lib.improved_ct_num_points(ks, 100_000, 10, 1280),
                                [11, 11, 21, 161, 1281])
  sigma = jnp.asarray([2.0, 5.0, 50.0])
  gaps = [sigma - cm_lib.ect_smaller_sigma(sigma, stage, 0.002) for stage in range(4)]
  for early, late in zip(gaps, gaps[1:]):
    np.testing.assert_allclose(late, early / 2, rtol=1e-5)
  np.testing.assert_array_equal(cm_lib.ect_smaller_sigma(jnp.asarray([0.01, 0.5]), 0, 0.002),
                                np.float32(0.002))  # far pairs end at the boundary
  config = cm_config('ct', pairs='improved_ct')
  config.training.num_steps = 80
  objective = get_objective(config, LinearEps(2))
  images = np.zeros((512, 4, 4, 1), np.float32)
  t0 = np.asarray(draw(objective, images, opt_step=0)['t'])
  t_late = np.asarray(draw(objective, images, opt_step=79)['t'])
  assert len(np.unique(t0)) <= 10 < len(np.unique(t_late)) <= 1280
  assert t0.min() > 0.0 and t_late.max() <= objective.t_max + 1e-3


# ------------------------------------------------------------------ the train step


TOY = conftest.ToyDenoiser()


def _step(config, devices=None, tx=None, count=None):
  """One call of the real train step on a toy network, teacher = other toy params."""
  mesh = make_mesh(devices)
  parts = TrainParts.build(config, TOY, tx)
  state = create_train_state(config, mesh, parts)
  objective = parts.objective
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(p.size), p.shape),
                        state.params)
  state = state.replace(params=params, objective_state=objective.init_state(params))
  if count is not None:  # counts the teacher steps that the traced program contains
    real_step = objective.teacher_step
    objective.teacher_step = lambda *a: (count.append(1), real_step(*a))[1]
  teacher = jax.tree.map(lambda p: 0.5 * p, state.params)
  frozen = jax.device_put(objective.init_frozen(teacher), NamedSharding(mesh, P()))
  step = make_train_step(config, mesh, parts)
  rng = np.random.default_rng(0)
  b, s = config.training.batch_size, config.data.image_size
  sharding = NamedSharding(mesh, P('data'))
  batch = {'image': jax.device_put(rng.uniform(-1, 1, (b, s, s, 1)).astype(np.float32), sharding),
           'label': jax.device_put(np.zeros((b,), np.int32), sharding)}
  state, metrics = step(state, batch, frozen)
  return jax.device_get(state), jax.device_get(metrics)


def step_config(**adv):
  config = cm_config('cd', size=8, pairs='grid', num_points=6)
  config.adv.update(adv)
  return config


def test_cm_free_with_one_pass_is_the_standard_step():
  standard, m_std = _step(step_config(method='none'))
  free, m_free = _step(step_config(method='free', steps=1, radius=0.3))
  conftest.assert_trees_equal(standard, free)
  assert m_std['loss'] == m_free['loss']


@pytest.mark.parametrize('method', ['free', 'pgd', 'fgsm'])
def test_cm_zero_radius_is_at_off(method):
  _, m_std = _step(step_config(method='none'))
  _, m = _step(step_config(method=method, steps=2, radius=0.0, init='uniform'))
  assert m['delta_over_radius'] == 0.0
  np.testing.assert_allclose(m['clean_loss'], m_std['loss'], rtol=1e-6)
  if method != 'free':
    np.testing.assert_allclose(m['loss'], m_std['loss'], rtol=1e-6)


@pytest.mark.parametrize('method,norm', [('free', 'l2'), ('pgd', 'linf')])
def test_cm_attack_stays_in_the_ball_and_raises_the_loss(method, norm):
  radius = 0.3 if norm == 'l2' else 0.05
  config = step_config(method=method, norm=norm, steps=3, radius=radius, step_size=radius,
                       radius_scale='absolute')
  _, m = _step(config, tx=optax.sgd(0.0))
  assert 0.5 < m['delta_over_radius'] <= 1.0 + 1e-5
  assert m['loss'] > m['clean_loss']


@pytest.mark.parametrize('target_at,teacher_steps', [('clean', 1), ('perturbed', 4)])
def test_teacher_runs_once_per_minibatch_unless_the_target_follows_delta(target_at,
                                                                         teacher_steps):
  config = step_config(method='free', steps=3)
  config.consistency.target_at = target_at
  count = []
  _step(config, count=count)
  assert len(count) == teacher_steps  # clean: in draw only; perturbed: also in every pass


def test_cm_step_on_eight_devices_matches_one_with_a_target_ema():
  config = step_config(method='free', steps=2, radius=0.3, radius_scale='absolute',
                       init='uniform')
  config.consistency.target_ema = 0.9
  tx = optax.sgd(0.05)
  state8, m8 = _step(config, jax.devices(), tx=tx)
  state1, m1 = _step(config, jax.devices()[:1], tx=tx)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  conftest.assert_trees_equal(state8.params, state1.params, rtol=1e-4, atol=1e-6)
  conftest.assert_trees_equal(state8.objective_state, state1.objective_state, rtol=1e-4,
                              atol=1e-6)


def test_target_network_is_an_ema_of_the_student_after_every_update():
  mu, k = 0.5, 2
  config = cm_config('ct', size=8)
  config.adv.update(method='free', steps=k)
  config.consistency.target_ema = mu
  plus_one = optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(jnp.ones_like, updates), state))
  start = jax.device_get(create_train_state(config, make_mesh(),
                                              TrainParts.build(config, TOY, plus_one)))
  state, _ = _step(config, tx=plus_one)
  for p0, target in zip(jax.tree.leaves(start.params),
                        jax.tree.leaves(state.objective_state['target'])):
    p0 = p0 + 0.02 * np.asarray(jax.random.normal(jax.random.key(p0.size), p0.shape))
    np.testing.assert_allclose(target, mu**2 * p0 + mu * (1 - mu) * (p0 + 1) + (1 - mu) * (p0 + 2),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize('field,value,message', [
    ('consistency.num_points', 1, r'consistency.num_points=1: must be >= 2'),
    ('consistency.target_ema', 1.0, r'consistency.target_ema=1.0: must be in \[0, 1\)'),
    ('consistency.target_ema', -0.1, r'consistency.target_ema=-0.1: must be in \[0, 1\)'),
    ('consistency.skip', 6, r'consistency.skip=6: must be at most num_points - 1 = 5'),
    ('consistency.scalings', 'edm', r'consistency.scalings=.edm.: must be one of lcm, cm'),
    ('consistency.sigma_max', 1e9, r'consistency.sigma_max=1000000000.0: must lie in'),
    ('teacher', '', r"config.teacher='': consistency distillation needs a teacher"),
    ('training.timestep_sampler', 'loss_second_moment', r'belongs to objective=dpm'),
    ('input_perturbation.gamma', 0.1, r'belongs to objective=dpm'),
    ('objective', 'sct', r"objective='sct': must be one of dpm, cd, ct"),
])
def test_bad_consistency_values_name_the_field(field, value, message):
  config = cm_config('cd', num_points=6)
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_training(config, num_devices=8)


def _fake_teacher(path, model=None, **data):
  """A workdir with a DPM run's config.json and no checkpoint."""
  teacher = conftest.tiny_config()
  teacher.model.ch_mult, teacher.model.attn_resolutions = (1,), ()
  teacher.model.update(model or {})
  teacher.data.update(data)
  path.mkdir()
  checkpoint.save_config(str(path), teacher)
  return str(path)


@pytest.mark.parametrize('problem,error,message', [
    ('missing', config_lib.ConfigError, r'config.teacher=.*: no such directory'),
    ('image_size', config_lib.ConfigError,
     r'config.data.image_size=8: the run config.teacher=.* has data.image_size=16'),
    # Same shapes, another network: the student would start from weights it misreads.
    ('timestep_scale', config_lib.ConfigError,
     r'config.model.timestep_scale=1.0: the run config.teacher=.* has '
     r'model.timestep_scale=0.25; the student starts as the teacher'),
    ('no_checkpoint', checkpoint.CheckpointError, r'no checkpoint found under'),
])
def test_bad_teacher_stops_distillation_before_compiling(tmp_path, problem, error, message):
  config = cm_config('cd', size=8)
  if problem == 'missing':
    config.teacher = str(tmp_path / 'nowhere')
  elif problem == 'image_size':
    config.teacher = _fake_teacher(tmp_path / 'big', image_size=16)
  elif problem == 'timestep_scale':
    config.teacher = _fake_teacher(tmp_path / 'rescaled', {'timestep_scale': 0.25},
                                   image_size=8)
  else:
    config.teacher = _fake_teacher(tmp_path / 'empty', image_size=8)
  with conftest.no_compiles(), pytest.raises(error, match=message):
    train.train(config, str(tmp_path / 'run'))


# ------------------------------------------------------------------ end to end


def test_distillation_from_a_dpm_run_resumes_exactly_and_samples(tmp_path):
  from atdiff_jax import evaluation  # pylint: disable=g-import-not-at-top
  teacher = conftest.tiny_config()
  teacher.model.ch_mult, teacher.model.attn_resolutions = (1,), ()
  teacher.training.num_steps = 2
  teacher_state = train.train(teacher, str(tmp_path / 'teacher'))

  config = cm_config('cd', size=8, num_points=6, target_ema=0.5)
  config.teacher = str(tmp_path / 'teacher')
  config.training.num_steps = 4
  straight = train.train(config, str(tmp_path / 'straight'))
  config.training.num_steps = 2
  first_half = train.train(config, str(tmp_path / 'resumed'))
  config.training.num_steps = 4
  resumed = train.train(config, str(tmp_path / 'resumed'))
  conftest.assert_trees_equal(straight, resumed)
  assert not np.allclose(jax.tree.leaves(first_half.params)[0],
                         jax.tree.leaves(teacher_state.ema_params[0])[0])

  # The student started as the teacher's EMA weights, and so did its target network.
  mesh = make_mesh()
  fresh = checkpoint.Checkpointer(str(tmp_path / 'fresh'), keep=1)
  start = train._initial_state(config, mesh, TrainParts.build(config),  # pylint: disable=protected-access
                               fresh)
  fresh.close()
  conftest.assert_trees_equal(start.params, teacher_state.ema_params[0])
  conftest.assert_trees_equal(start.objective_state['target'], teacher_state.ema_params[0])

  run = evaluation.load_run(str(tmp_path / 'straight'))
  images = evaluation.generate(run, 16, sampler='consistency', nfe=2, batch_size=8)
  assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8
  assert images.std() > 0
