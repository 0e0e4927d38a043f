"""The sampler hooks and the mismatch / robustness probes, on closed-form models."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atdiff_jax import adversarial, config as config_lib, samplers
from conftest import tiny_config
from atdiff_jax.evaluation import mismatch, probe, robustness
from gaussian_oracle import BETAS, T, key, learned_sigma_oracle, oracle_model

SHAPE = (8, 2, 2, 2)
NFE = 5


@pytest.mark.parametrize('name', list(samplers.SAMPLERS))
def test_trajectory_and_perturbation_hooks(name):
  sample = samplers.get_sampler(name)
  radius = 0.5
  # Step 2's input moves by a fixed vector of L2 norm `radius` per example.
  shift = radius / np.sqrt(np.prod(SHAPE[1:]))
  perturb = lambda model_fn, x, y, ctx: jnp.where(ctx.step == 2, x + shift, x)

  def run(rng):
    plain = sample(oracle_model, rng, SHAPE, BETAS, NFE, clip_x0=False)
    x0, clean = sample(oracle_model, rng, SHAPE, BETAS, NFE, clip_x0=False,
                       return_trajectory=True)
    _, hit = sample(oracle_model, rng, SHAPE, BETAS, NFE, clip_x0=False,
                    return_trajectory=True, perturb_fn=perturb)
    return plain, x0, clean, hit

  plain, x0, clean, hit = jax.jit(run)(key(0))
  np.testing.assert_array_equal(plain, x0)  # recording changes nothing
  assert clean.x.shape == clean.eps.shape == (NFE,) + SHAPE
  assert clean.t.shape == clean.alpha.shape == clean.sigma.shape == (NFE,)
  assert np.all(np.diff(np.asarray(clean.t)) < 0)  # high noise first
  np.testing.assert_allclose(np.square(clean.alpha) + np.square(clean.sigma), 1.0, atol=1e-5)
  # The recorded eps is the model's output at the recorded input.
  np.testing.assert_allclose(
      clean.eps[3], oracle_model(clean.x[3], jnp.full((SHAPE[0],), clean.t[3]), None),
      atol=1e-5)
  np.testing.assert_array_equal(hit.x[:2], clean.x[:2])
  np.testing.assert_allclose(hit.x[2] - clean.x[2], shift, atol=1e-5)
  assert np.abs(np.asarray(hit.x[3:] - clean.x[3:])).max() > 1e-3  # and the rest follows


def test_mismatch_gap_vanishes_for_exact_ancestral_sampling_only():
  """Ancestral sampling with the exact mean and variance draws (x_t, x0) from the forward
  process, so its eps-error on its own x_t equals that on q's; a model that over-predicts
  the noise leaves x_t off that distribution and the gap opens."""
  shape, nfe = (1024, 2, 2, 2), 10
  exact = learned_sigma_oracle(nfe)
  biased = lambda x, t, y: exact(x, t, y) * jnp.asarray([1.2, 1.2, 1.0, 1.0])

  def result(model):
    with_params = lambda x, t, y, params: model(x, t, y)  # as a network takes its params
    fn = mismatch.make_mismatch_fn(with_params, 'ancestral', BETAS, nfe, shape, clip_x0=False)
    return mismatch.run_mismatch(fn, None, 'ancestral', nfe, 1.0, shape[0], 2 * shape[0])

  good, bad = result(exact), result(biased)
  assert good.num_samples == 2048 and good.t.shape == (nfe,)
  rel_good = np.abs(good.gap) / good.values['err_q']
  rel_bad = np.abs(bad.gap) / bad.values['err_q']
  # The last ancestral step adds no noise: x0 is a function of x_t there, as for DDIM.
  assert rel_good[:-1].max() < 0.02, rel_good
  assert rel_good[-1] == pytest.approx(1.0)
  assert rel_bad[:-1].max() > 0.5, rel_bad
  np.testing.assert_allclose(good.values['eps_ms_sampler'], good.values['eps_ms_q'], rtol=0.05)
  rows = good.rows()
  assert [r['step'] for r in rows] == list(range(nfe))
  assert rows[0]['ratio'] == pytest.approx(rows[0]['err_sampler'] / rows[0]['err_q'])


def _linear_model(c):
  return lambda x, t, y: c * x


@pytest.mark.parametrize('norm', ['l2', 'linf'])
def test_worst_delta_stays_in_the_ball_and_reaches_the_closed_form_maximum(norm):
  """For eps(x) = c x the loss |e + a delta|^2 (a = c - 1/sigma) over an L2 ball of radius r
  peaks at (|e| + |a| r)^2 per example; over an L-inf ball at sum (|e_i| + |a| r)^2."""
  ball = robustness.attack_ball(norm, 0.1, 3, SHAPE[1:])
  dim = np.prod(SHAPE[1:])
  assert ball.radius == pytest.approx(0.1 * np.sqrt(dim) if norm == 'l2' else 0.1)
  rng = np.random.default_rng(0)
  e = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  a = 0.5 - 1.0 / 0.3
  loss = lambda d: jnp.sum(jnp.square(e + a * d).reshape(SHAPE[0], -1), axis=1)
  delta = robustness.worst_delta(loss, jax.random.key(1), SHAPE, ball, 3)
  assert np.all(np.asarray(adversarial.norms(delta, norm)) <= ball.radius * (1 + 1e-5))
  flat = np.abs(np.asarray(e).reshape(SHAPE[0], -1))
  if norm == 'l2':
    best = (np.linalg.norm(flat, axis=1) + abs(a) * ball.radius)**2
  else:
    best = np.sum((flat + abs(a) * ball.radius)**2, axis=1)
  reached = np.asarray(loss(delta))
  assert np.all(reached <= best * (1 + 1e-4))
  assert np.all(reached >= 0.9 * best)  # three steps from a random start
  start = adversarial.init_delta(jax.random.key(1), SHAPE, ball, 'uniform')
  assert np.all(reached > np.asarray(loss(start)))


def test_denoising_error_under_attack():
  timesteps = [0, T // 2, T - 1]
  small = robustness.attack_ball('l2', 1e-4, 2, SHAPE[1:])
  big = robustness.attack_ball('l2', 0.2, 2, SHAPE[1:])
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)
  out = {}
  for name, ball in (('small', small), ('big', big)):
    fn = robustness.make_denoising_fn(oracle_model, BETAS, timesteps, ball, 2)
    out[name] = jax.device_get(fn(key(0), x0, None))
  # Same noise for both radii (same rng): the clean errors agree exactly.
  np.testing.assert_allclose(out['small']['clean'], out['big']['clean'], rtol=1e-6)
  np.testing.assert_allclose(out['small']['adversarial'], out['small']['clean'], rtol=1e-2)
  assert np.all(out['big']['adversarial'] >= out['big']['clean'])
  # At t = T-1 the exact eps is x_t itself, and eps + delta / sigma moves with the input.
  assert np.all(out['big']['adversarial'][:2] > 1.1 * out['big']['clean'][:2])
  with pytest.raises(ValueError, match='timesteps'):
    robustness.make_denoising_fn(oracle_model, BETAS, [T], big, 2)


def test_sampling_attack_hits_only_the_chosen_steps():
  ball = robustness.attack_ball('linf', 0.05, 2, SHAPE[1:])
  sample = samplers.get_sampler('ddim')
  at = robustness.resolve_steps(-2, NFE)
  assert at == (NFE - 2,) and robustness.resolve_steps('all', NFE) is None
  with pytest.raises(ValueError, match='attack step'):
    robustness.resolve_steps(NFE, NFE)

  def run(rng):
    _, clean = sample(oracle_model, rng, SHAPE, BETAS, NFE, clip_x0=False,
                      return_trajectory=True)
    _, hit = sample(oracle_model, rng, SHAPE, BETAS, NFE, clip_x0=False,
                    return_trajectory=True,
                    perturb_fn=robustness.make_sampling_attack(ball, 2, at))
    return clean, hit

  clean, hit = jax.jit(run)(key(0))
  step = NFE - 2
  np.testing.assert_array_equal(hit.x[:step], clean.x[:step])
  moved = np.abs(np.asarray(hit.x[step] - clean.x[step]))
  assert moved.max() <= 0.05 + 1e-6 and moved.max() > 0.04  # L-inf PGD ends on the box
  # The attack moved the model's x0 prediction further than a random shift of that size.
  sigma, alpha = float(clean.sigma[step]), float(clean.alpha[step])
  x0_pred = lambda x, eps: (x - sigma * eps) / alpha
  shift = np.abs(np.asarray(x0_pred(hit.x[step], hit.eps[step])
                            - x0_pred(clean.x[step], clean.eps[step]))).mean()
  rng = np.random.default_rng(0)
  noise = jnp.asarray(rng.uniform(-0.05, 0.05, SHAPE), jnp.float32)
  t = jnp.full((SHAPE[0],), clean.t[step])
  random_shift = np.abs(np.asarray(
      x0_pred(clean.x[step] + noise, oracle_model(clean.x[step] + noise, t, None))
      - x0_pred(clean.x[step], clean.eps[step]))).mean()
  assert shift > 1.2 * random_shift


def test_mismatch_probe_samples_a_consistency_run_between_its_own_times(monkeypatch):
  """The run's sigma_max and t_min reach the probe's sampler; a run with t_min > 0 is
  refused, naming the field: its last sample is the t_min marginal, not the x0 the probe
  reads it as."""
  config = tiny_config()
  config.objective = 'ct'
  seen = []
  monkeypatch.setattr(mismatch, 'make_mismatch_fn', lambda *args, **opts: seen.append(opts))
  monkeypatch.setattr(mismatch, 'run_mismatch', lambda *args, **kwargs: None)
  run = types.SimpleNamespace(config=config, default_batch_size=8, model_fn=lambda: None,
                              betas=BETAS, mesh=None, params=None)
  mismatch.measure_mismatch(run, 'consistency', 2)
  mismatch.measure_mismatch(run, 'consistency', 2, sigma_max=5.0)  # given options win
  sigma_max = float(config.consistency.sigma_max)
  assert seen == [{'sigma_max': sigma_max, 't_min': 0.0}, {'sigma_max': 5.0, 't_min': 0.0}]
  config.consistency.t_min = 30
  with pytest.raises(config_lib.ConfigError, match=r'config\.consistency\.t_min=30: the '
                     'mismatch probe reads the last sample as x0'):
    mismatch.measure_mismatch(run, 'consistency', 2)
  with pytest.raises(config_lib.ConfigError, match='consistency.t_min=30'):
    probe.validate_probe(config, 2)
