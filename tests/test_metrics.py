"""FID, precision / recall and Inception Score math (no network)."""
import numpy as np
import pytest
import scipy.linalg

from atdiff_jax.metrics import fid, inception_score
from atdiff_jax.metrics import precision_recall as pr


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


def test_stats_file_with_spatial_stats_and_files_without_them(tmp_path):
  rng = np.random.default_rng(6)
  mu, sigma = rng.normal(size=4), np.eye(4)
  mu_s, sigma_s = rng.normal(size=3), np.diag([1.0, 2.0, 3.0])
  path = str(tmp_path / 'stats.npz')
  fid.save_stats(path, mu, sigma, mu_spatial=mu_s, sigma_spatial=sigma_s, num_images=7)
  stats = fid.load_stats(path)
  assert stats.has_spatial and stats.num_images == 7 and stats.features is None
  np.testing.assert_array_equal(stats.mu_spatial, mu_s)
  np.testing.assert_array_equal(stats.sigma_spatial, sigma_s)
  with np.load(path) as data:  # the ADM reference batches' names
    np.testing.assert_array_equal(data['mu_s'], mu_s)
  # A file of the earlier layout: FID statistics only.
  old = str(tmp_path / 'old.npz')
  with open(old, 'wb') as f:
    np.savez(f, mu=mu, sigma=sigma, meta_num_images=np.asarray(7))
  stats = fid.load_stats(old)
  assert not stats.has_spatial and stats.mu_spatial is None and stats.num_images == 7
  np.testing.assert_array_equal(stats.mu, mu)
  with pytest.raises(ValueError, match='both'):
    fid.save_stats(path, mu, sigma, mu_spatial=mu_s)


# --- precision / recall ----------------------------------------------------------------


def _brute_precision_recall(ref, samples, k=3):
  """Exact float64 reference: k-th neighbour radii, then ball membership."""
  def sq_dist(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

  def radii(x):
    d = sq_dist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]

  cross = sq_dist(ref, samples)
  precision = (cross <= radii(ref)[:, None]).any(axis=0).mean()
  recall = (cross <= radii(samples)[None, :]).any(axis=1).mean()
  return precision, recall, radii(ref)


def test_precision_recall_of_a_set_with_itself_is_one():
  feats = np.random.default_rng(0).normal(size=(50, 16))
  assert pr.precision_recall(feats, feats) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
  rng = np.random.default_rng(1)
  ref, samples = rng.normal(size=(30, 8)), rng.normal(40.0, 1.0, size=(20, 8))
  assert pr.precision_recall(ref, samples) == (0.0, 0.0)


def test_precision_recall_counts_the_covered_clusters():
  # Clusters of unit offsets along separate axes, 10 apart: within a cluster of 4 every
  # point's 3rd neighbour is at distance sqrt(2); other clusters are far outside.
  def cluster(center, axes):
    points = np.zeros((len(axes), 12))
    points[:, 0] = 10.0 * center
    points[np.arange(len(axes)), axes] = 1.0
    return points

  a, b, c = (cluster(i, [1, 2, 3, 4]) for i in range(3))
  foreign = cluster(5, [1, 2, 3, 4, 5, 6])
  ref = np.concatenate([a, b, c])               # 12 reference features
  samples = np.concatenate([a, foreign])        # 10 samples, 4 of them on cluster a
  precision, recall = pr.precision_recall(ref, samples)
  assert precision == pytest.approx(4 / 10) and recall == pytest.approx(4 / 12)
  np.testing.assert_allclose(pr.manifold_radii(ref), 2.0, rtol=1e-5)


def test_precision_recall_matches_brute_force_at_any_block_size():
  rng = np.random.default_rng(2)
  ref, samples = rng.normal(size=(37, 5)), rng.normal(0.5, 1.2, size=(29, 5))
  precision, recall, radii = _brute_precision_recall(ref, samples)
  assert 0.2 < precision < 0.9 and 0.2 < recall < 1.0  # a case with something to get wrong
  for block_size in (1, 8, 29, 37, 1000):  # padded last blocks, one block, one row each
    assert pr.precision_recall(ref, samples, block_size=block_size) == (
        pytest.approx(precision, abs=1e-12), pytest.approx(recall, abs=1e-12))
  np.testing.assert_allclose(pr.manifold_radii(ref, block_size=8), radii, rtol=1e-5)
  with pytest.raises(ValueError, match='N > k'):
    pr.precision_recall(ref[:3], samples)


def test_random_subset_is_uniform_ordered_and_independent_of_batching():
  rows = np.arange(70, dtype=np.float32).reshape(35, 2)
  whole = pr.RandomSubset(10, seed=3)
  whole.update(rows)
  batched = pr.RandomSubset(10, seed=3)
  for chunk in np.array_split(rows, [5, 6, 20]):
    batched.update(chunk)
  kept = whole.result()
  assert kept.shape == (10, 2) and whole.count == 35
  np.testing.assert_array_equal(batched.result(), kept)
  assert (np.diff(kept[:, 0]) > 0).all() and set(kept[:, 0]) <= set(rows[:, 0])
  small = pr.RandomSubset(50)
  small.update(rows)
  np.testing.assert_array_equal(small.result(), rows)  # fewer rows than size: all of them
  # A larger subset cut to `limit` is the smaller subset of the same seed (samples keep
  # more features than a reference, from the same accumulator).
  large = pr.RandomSubset(30, seed=3)
  for chunk in np.array_split(rows, [7, 8, 31]):
    large.update(chunk)
  np.testing.assert_array_equal(large.result(limit=10), kept)
  assert large.result().shape == (30, 2) and large._rows.shape[0] == 30  # grown, not more
  counts = np.zeros(20)
  for seed in range(400):
    subset = pr.RandomSubset(5, seed)
    subset.update(np.arange(20, dtype=np.float32)[:, None])
    counts[subset.result()[:, 0].astype(int)] += 1
  assert counts.sum() == 2000 and counts.min() > 60 and counts.max() < 140  # ~100 each


def test_manifold_features_file_round_trip(tmp_path):
  feats = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
  stats_path = str(tmp_path / 'inception_fid_cifar10-train-32_stats.npz')
  path = pr.manifold_features_path(stats_path)
  assert path == str(tmp_path / 'inception_fid_cifar10-train-32_stats_manifold.npz')
  pr.save_manifold_features(path, feats, num_images=100)
  np.testing.assert_array_equal(pr.load_manifold_features(path), feats)
  with pytest.raises(FileNotFoundError):
    pr.load_manifold_features(str(tmp_path / 'absent.npz'))


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


def test_precision_recall_with_known_reference_radii():
  rng = np.random.default_rng(5)
  ref, samples = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.3
  radii = pr.manifold_radii(ref)
  assert pr.precision_recall(ref, samples, ref_radii=radii) == pr.precision_recall(ref, samples)
  # Radii of nothing: no sample is inside the reference manifold.
  assert pr.precision_recall(ref, samples, ref_radii=np.full(40, -1.0))[0] == 0.0
  with pytest.raises(ValueError, match='ref_radii'):
    pr.precision_recall(ref, samples, ref_radii=radii[:5])
