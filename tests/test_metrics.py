"""FID and Inception Score math (numpy only; no network)."""
import numpy as np
import pytest
import scipy.linalg

from atdiff_jax.metrics import fid, inception_score


def _diag_closed_form(mu1, s1, mu2, s2):
  return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2)))


def test_fid_of_a_set_with_itself_is_zero():
  feats = np.random.default_rng(0).normal(size=(400, 16)) @ np.diag(np.linspace(0.1, 3, 16))
  assert fid.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  s1, s2 = rng.uniform(0.1, 4.0, 8), rng.uniform(0.1, 4.0, 8)
  expected = _diag_closed_form(mu1, s1, mu2, s2)
  assert expected > 1.0
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_fid_of_gaussian_samples_approaches_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
  s1, s2 = np.array([1.0, 2.0, 0.5, 4.0]), np.array([2.0, 0.5, 0.5, 1.0])
  x1 = mu1 + np.sqrt(s1) * rng.normal(size=(40_000, 4))
  x2 = mu2 + np.sqrt(s2) * rng.normal(size=(40_000, 4))
  expected = _diag_closed_form(mu1, s1, mu2, s2)  # 6 + 1.93 = 7.93
  assert fid.fid_from_features(x1, x2) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_matches_sqrtm_for_full_covariances():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='shape mismatch'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_float64_and_running_stats_agree():
  feats = np.random.default_rng(4).normal(5.0, 2.0, size=(300, 7)).astype(np.float32)
  mu, sigma = fid.feature_stats(feats)
  assert mu.dtype == np.float64 and sigma.shape == (7, 7)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False))
  running = fid.RunningFeatureStats(7)
  for chunk in np.array_split(feats, [50, 51, 200]):  # uneven batches, one of size 1
    running.update(chunk)
  r_mu, r_sigma = running.result()
  assert running.count == 300
  np.testing.assert_allclose(r_mu, mu, rtol=1e-12)
  np.testing.assert_allclose(r_sigma, sigma, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError):
    fid.feature_stats(feats[:1])


def test_stats_file_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=4), np.cov(rng.normal(size=(20, 4)), rowvar=False)
  path = str(tmp_path / 'ref' / 'cifar10_train.npz')
  fid.save_stats(path, mu, sigma, num_images=50000, dataset='cifar10')
  stats = fid.load_stats(path)
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma, sigma)
  assert stats.num_images == 50000 and stats.metadata['dataset'] == 'cifar10'
  # A plain {mu, sigma} file (pytorch-fid / ADM layout) loads without metadata.
  plain = str(tmp_path / 'plain.npz')
  np.savez(plain, mu=mu, sigma=sigma)
  assert fid.load_stats(plain).num_images is None
  with pytest.raises(FileNotFoundError):
    fid.load_stats(str(tmp_path / 'absent.npz'))
  with pytest.raises(ValueError, match='scalar'):
    fid.save_stats(path, mu, sigma, labels=[1, 2])


def test_inception_score_of_uniform_predictions_is_one():
  mean, std = inception_score.inception_score(np.zeros((20, 1008)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_predictions_is_class_count():
  logits = np.full((10, 1008), -50.0)
  logits[np.arange(10), np.arange(10) * 7] = 50.0  # 10 distinct, certain classes
  assert inception_score.inception_score(logits, num_splits=1)[0] == pytest.approx(10.0, rel=1e-9)
  # Consecutive splits of 5: each split sees 5 distinct classes.
  mean, std = inception_score.inception_score(logits, num_splits=2)
  assert mean == pytest.approx(5.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_hand_computed_and_shift_invariant():
  # p(y|x) = (3/4, 1/4) and (1/4, 3/4): p(y) = (1/2, 1/2), KL = 3/4 ln 1.5 + 1/4 ln 0.5 each.
  logits = np.log(np.array([[0.75, 0.25], [0.25, 0.75]]))
  expected = np.exp(0.75 * np.log(1.5) + 0.25 * np.log(0.5))
  assert inception_score.inception_score(logits, 1)[0] == pytest.approx(expected, rel=1e-12)
  assert inception_score.inception_score(logits + 7.0, 1)[0] == pytest.approx(expected, rel=1e-12)
  with pytest.raises(ValueError):
    inception_score.inception_score(logits, num_splits=3)
