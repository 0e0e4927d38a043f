"""Sampling and evaluation from checkpoints: load_run, generate, --mode=sample, --mode=eval.

One module-scoped workdir holds a tiny model's checkpoint, written the way training writes
it (Checkpointer + config.json) but without running training steps, whose compilation
would cost most of this file's time budget.
"""
import copy
import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from atdiff_jax import checkpoint
from atdiff_jax import config as config_lib
from atdiff_jax import evaluation
from atdiff_jax.samplers import from_config
from atdiff_jax.data.sources import ArraySource
from atdiff_jax.evaluation import report, sweep
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.parallel import make_mesh
from conftest import assert_trees_equal, tiny_config

# The package exports the function `generate`, which hides the module of that name.
generate_lib = importlib.import_module('atdiff_jax.evaluation.generate')

STEP = 6
BATCH = 16
NFE = 2  # every test samples with this NFE where it can: the compiled program is reused


def _eval_config():
  config = tiny_config()
  config.model.ch_mult = (1,)  # one resolution, no attention: quick to compile
  config.model.attn_resolutions = ()
  config.training.ema_rates = (0.9, 0.999)
  ev = config.eval
  ev.batch_size = BATCH
  ev.num_samples = 40  # 2.5 batches: a short last shard
  ev.sampler, ev.nfe = 'dpm_solver++', NFE
  ev.samplers, ev.nfes, ev.eps_scales = ('ddim', 'dpm_solver++'), (3, NFE), (1.0,)
  return config


def _random_state(config, mesh, seed):
  """A TrainState of the run's structure filled with small random values.

  Built from the abstract state (no init compile); only the structure and the values
  matter to these tests, not how trained the weights are.
  """
  from atdiff_jax.train_step import TrainParts, make_init_fn  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(make_init_fn(config, TrainParts.build(config)), jax.random.key(0))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: np.asarray(0.05 * rng.standard_normal(s.shape), s.dtype),
                       abstract)
  return jax.device_put(state, NamedSharding(mesh, P()))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, config, state): one checkpoint, params and two EMA trees all different."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = _eval_config()
  state = _random_state(config, make_mesh(), seed=0)
  state = state.replace(step=jnp.asarray(STEP, jnp.int32))
  ckpt = checkpoint.Checkpointer(workdir, keep=5, async_save=False)
  ckpt.save(STEP, state)
  ckpt.close()
  checkpoint.save_config(workdir, config)
  return workdir, config, state


@pytest.fixture(scope='module')
def run(trained):
  return evaluation.load_run(trained[0])



def test_load_run_restores_the_requested_weights(trained, run):
  workdir, _, state = trained
  assert run.step == STEP and run.weights_name == 'ema0.9'
  assert_trees_equal(run.params, state.ema_params[0])
  leaf = jax.tree.leaves(run.params)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8

  second = evaluation.load_run(workdir, step=STEP, ema_index=1)
  assert second.weights_name == 'ema0.999'
  assert_trees_equal(second.params, state.ema_params[1])
  raw = evaluation.load_run(workdir, use_ema=False)
  assert raw.weights_name == 'params'
  assert_trees_equal(raw.params, state.params)

  with pytest.raises(checkpoint.CheckpointError, match=r'no checkpoint for step 5.*\[6\]'):
    evaluation.load_run(workdir, step=5)
  with pytest.raises(config_lib.ConfigError, match='ema_index=2'):
    evaluation.load_run(workdir, ema_index=2)


def test_generate_is_reproducible_and_independent_of_the_device_count(trained, run):
  images = evaluation.generate(run, 20, nfe=NFE, batch_size=BATCH, seed=3)
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
  assert images.std() > 0
  again = evaluation.generate(run, 20, nfe=NFE, batch_size=BATCH, seed=3)
  np.testing.assert_array_equal(images, again)
  other_seed = evaluation.generate(run, 20, nfe=NFE, batch_size=BATCH, seed=4)
  assert np.mean(other_seed != images) > 0.2
  # The batches differ from each other: batch b has its own key, fold_in(seed, b).
  assert np.mean(images[:4] != images[BATCH:BATCH + 4]) > 0.2

  single = evaluation.load_run(trained[0], mesh=make_mesh(jax.devices()[:1]))
  on_one = evaluation.generate(single, 20, nfe=NFE, batch_size=BATCH, seed=3)
  # Same noise and weights; only the float summation order of 8 shards may differ.
  diff = np.abs(on_one.astype(int) - images.astype(int))
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.99


def test_sample_fn_returns_images_in_range_sharded(run):
  fn = run.sample_fn('dpm_solver++', nfe=NFE, batch_size=BATCH, eps_scale=1.02)
  images = fn(jax.random.key(0))
  assert images.shape == (BATCH, 8, 8, 1)
  assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
  assert len(images.sharding.device_set) == 8 and not images.sharding.is_fully_replicated
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    run.sample_fn(batch_size=12)
  with pytest.raises(ValueError, match='nfe must be in'):
    run.sample_fn(nfe=1000)


def test_batch_labels_cycle_over_the_global_image_index():
  np.testing.assert_array_equal(generate_lib.batch_labels(2, 16, 10),
                                np.arange(32, 48) % 10)
  assert generate_lib.batch_labels(0, 16, 0) is None


def _shards(out_dir):
  return sorted(n for n in os.listdir(out_dir) if n.startswith('samples_'))


def test_sample_mode_writes_shards_and_resumes(trained):
  workdir, config, _ = trained
  out_dir = evaluation.sample_mode(workdir, config)
  assert out_dir == os.path.join(workdir, 'samples', f'dpm_solver++_nfe{NFE}_es1')
  assert _shards(out_dir) == ['samples_00000000_00000016.npz',
                              'samples_00000016_00000032.npz',
                              'samples_00000032_00000040.npz']
  images, labels = evaluation.load_samples(out_dir)
  assert images.shape == (40, 8, 8, 1) and images.dtype == np.uint8 and labels is None
  with Image.open(os.path.join(out_dir, 'grid.png')) as grid:
    assert grid.size[0] > 32
  options = eval_settings.options_of(config.eval, 'dpm_solver++')
  np.testing.assert_array_equal(
      images, evaluation.generate(evaluation.load_run(workdir), 40, nfe=NFE,
                                  batch_size=BATCH, seed=0, **options))

  # Resume: the missing shard is made again, the others are kept untouched.
  kept = {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in _shards(out_dir)}
  os.remove(os.path.join(out_dir, 'samples_00000016_00000032.npz'))
  del kept['samples_00000016_00000032.npz']
  evaluation.sample_mode(workdir, config)
  assert {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in kept} == kept
  np.testing.assert_array_equal(evaluation.load_samples(out_dir)[0], images)

  # Other settings in the same folder are refused rather than mixed.
  config = config.copy_and_resolve_references()
  config.eval.seed = 1
  config.eval.out_dir = out_dir
  with pytest.raises(config_lib.ConfigError, match='other settings.*seed'):
    evaluation.sample_mode(workdir, config)


def test_eval_writes_reports_and_skips_done_cells(trained, monkeypatch):
  workdir, config, _ = trained
  rows = evaluation.eval_mode(workdir, config)
  eval_dir = os.path.join(workdir, 'eval')
  cells = [('ddim', 3), ('ddim', NFE), ('dpm_solver++', 3), ('dpm_solver++', NFE)]
  assert [(r['sampler'], r['nfe']) for r in rows] == cells
  for row in rows:
    assert row['step'] == STEP and row['num_samples'] == 40
    assert np.isfinite(row['fd_digits']) and row['fd_digits'] > 0
    assert 'fid' not in row

  with open(os.path.join(eval_dir, 'results.json')) as f:
    assert len(json.load(f)['rows']) == 4
  with open(os.path.join(eval_dir, 'results.csv')) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith('step,weights,sampler,nfe,eps_scale,num_samples,seed,fd_digits')
  assert len(lines) == 5
  with open(os.path.join(eval_dir, 'results.md')) as f:
    markdown = f.read()
  assert markdown.count('| ddim | ') == 3 and markdown.count('| dpm_solver++ | ') == 3
  with Image.open(os.path.join(eval_dir, 'fid_vs_nfe.png')) as plot:
    assert plot.format == 'PNG' and plot.size[0] > 300

  # Restart with one cell dropped from results.json: only that cell is sampled again.
  with open(os.path.join(eval_dir, 'results.json')) as f:
    saved = json.load(f)
  saved['rows'] = [r for r in saved['rows'] if (r['sampler'], r['nfe']) != ('ddim', 3)]
  with open(os.path.join(eval_dir, 'results.json'), 'w') as f:
    json.dump(saved, f)
  evaluated = []
  real_cell = sweep.evaluate_cell
  monkeypatch.setattr(sweep, 'evaluate_cell',
                      lambda run, cell, m: evaluated.append(cell) or real_cell(run, cell, m))
  again = evaluation.eval_mode(workdir, config)
  assert evaluated == [sweep.Cell('ddim', 3, 1.0)]
  assert [r['fd_digits'] for r in again] == pytest.approx([r['fd_digits'] for r in rows])
  assert len(report.load_rows(eval_dir)) == 4


def test_missing_inception_weights_is_a_clear_error(trained, tmp_path):
  with pytest.raises(FileNotFoundError, match='convert_inception'):
    evaluation.inception_features(str(tmp_path / 'inception.msgpack'))

  # Through the command line: stops before loading or compiling anything.
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = json.load(open(os.path.join(trained[0], checkpoint.CONFIG_FILE)))
  config['eval']['inception_weights'] = str(tmp_path / 'inception.msgpack')
  (workdir / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
  result = subprocess.run(
      [sys.executable, '-m', 'atdiff_jax.main', f'--workdir={workdir}', '--mode=eval'],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'config.eval.inception_weights' in result.stderr
  assert 'python -m atdiff_jax.tools.convert_inception' in result.stderr


def test_config_of_another_model_is_refused(trained):
  workdir, config, _ = trained
  other = config.copy_and_resolve_references()
  other.model.ch = 64
  with pytest.raises(config_lib.ConfigError, match=r'another model.*model.ch=64 \(the run: 32\)'):
    evaluation.resolve_config(workdir, other)
  other = config.copy_and_resolve_references()
  other.eval.nfes = (0,)
  with pytest.raises(config_lib.ConfigError, match=r'config.eval.nfes=0'):
    evaluation.validate_eval(evaluation.resolve_config(workdir, other), 'eval', 8)


def test_inception_metrics_use_cached_reference_stats_from_the_data(trained, run, tmp_path,
                                                                    monkeypatch):
  """The FID wiring, with a cheap stand-in for the Inception network."""
  weights = tmp_path / 'inception_fid.msgpack'
  weights.write_bytes(b'stand-in')
  projection = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)

  def fake_inception(path, mesh=None):
    assert path == str(weights) and mesh is run.mesh
    def features(images):
      flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
      return flat, flat @ projection, flat[:, :16] ** 2
    return evaluation.FeatureExtractor('fid', features, 64, inception_score=True,
                                       spatial_dim=16, max_manifold=500)

  monkeypatch.setattr(evaluation.metrics, 'inception_features', fake_inception)
  config = trained[1].copy_and_resolve_references()
  config.eval.samplers, config.eval.nfes = ('dpm_solver++',), (NFE,)
  config.eval.inception_weights = str(weights)
  inception_run = dataclasses.replace(run, config=config)
  rows = evaluation.evaluate(inception_run, out_dir=str(tmp_path / 'eval'), verbose=False)
  stats_path = tmp_path / 'inception_fid_digits-8_stats.npz'
  assert sweep.inception_stats_path(str(weights), config.data) == str(stats_path)
  reference = evaluation.metrics.load_reference(str(stats_path))
  assert reference.num_images == 1797 and reference.mu_spatial.shape == (16,)
  assert reference.features.shape == (500, 64)  # a random subset of the 1797 digits
  assert (tmp_path / 'inception_fid_digits-8_stats_manifold.npz').is_file()
  (row,) = rows
  assert {'fd_digits', 'fid', 'sfid', 'is', 'is_std', 'precision', 'recall'} <= set(row)
  assert row['fid'] > 0 and row['sfid'] > 0 and 1.0 <= row['is'] <= 12.0
  assert 0.0 <= row['precision'] <= 1.0 and 0.0 <= row['recall'] <= 1.0
  with open(tmp_path / 'eval' / 'results.csv') as f:
    assert 'fid,sfid,is,is_std,precision,recall,fd_digits' in f.readline()
  # A second run reads the cached statistics and finds the cell done.
  real_stats = evaluation.metrics.reference_stats

  def no_fid_stats(source, extractor, *args, **kwargs):
    assert extractor.name != 'fid', 'FID reference stats recomputed'
    return real_stats(source, extractor, *args, **kwargs)

  monkeypatch.setattr(evaluation.metrics, 'reference_stats', no_fid_stats)
  monkeypatch.setattr(sweep, 'evaluate_cell', lambda *a: pytest.fail('cell recomputed'))
  assert evaluation.evaluate(inception_run, out_dir=str(tmp_path / 'eval'),
                             verbose=False) == rows


def _stand_in_inception(max_manifold):
  """pool3 stand-in: the scaled pixels; spatial stand-in: squares of the first 10."""
  def fn(images):
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return flat, None, flat[:, :10] ** 2
  return evaluation.FeatureExtractor('fid', fn, 64, spatial_dim=10, max_manifold=max_manifold)


def _random_images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_metrics_of_a_set_against_itself():
  images = _random_images(80)
  extractor = _stand_in_inception(max_manifold=32)  # a random 32 of the 80
  reference = evaluation.reference_stats(ArraySource(images), extractor, batch_size=16)
  assert reference.num_images == 80 and reference.has_spatial
  assert reference.features.shape == (32, 64)
  result = evaluation.compute_metrics(images, reference, extractor, batch_size=24)
  assert list(result) == evaluation.metrics.metric_names(extractor, reference) == [
      'fid', 'sfid', 'precision', 'recall']
  assert result['fid'] == pytest.approx(0.0, abs=1e-8)
  assert result['sfid'] == pytest.approx(0.0, abs=1e-8)
  # The samples keep all 80 features (up to 50k, as ADM), so every reference point has
  # its twin among them; at least those 32 samples lie in the reference manifold.
  assert result['recall'] == 1.0
  assert 32 / 80 <= result['precision'] <= 1.0
  other = evaluation.compute_metrics(_random_images(80, seed=1), reference, extractor)
  assert other['sfid'] > 0.01 and other['fid'] > 0.01


def test_old_reference_files_are_upgraded_or_skip_the_new_metrics(tmp_path, caplog,
                                                                  monkeypatch):
  images = _random_images(80)
  source, extractor = ArraySource(images), _stand_in_inception(max_manifold=32)
  fid_only = evaluation.reference_stats(
      source, dataclasses.replace(extractor, spatial_dim=0, max_manifold=0))
  assert not fid_only.has_spatial and fid_only.features is None
  # A cache written before sfid / precision / recall: recomputed once, with a warning.
  path = str(tmp_path / 'inception_fid_digits-8_stats.npz')
  evaluation.metrics.save_stats(path, fid_only.mu, fid_only.sigma, num_images=80)
  with caplog.at_level(logging.WARNING, logger='atdiff_jax.evaluation.metrics'):
    stats = evaluation.cached_reference_stats(path, source, extractor)
  assert 'recomputing' in caplog.text
  np.testing.assert_allclose(stats.mu, fid_only.mu, rtol=1e-12)
  loaded = evaluation.metrics.load_reference(path)
  assert loaded.has_spatial and loaded.num_images == 80
  np.testing.assert_array_equal(loaded.features, stats.features)
  monkeypatch.setattr(evaluation.metrics, 'reference_stats',
                      lambda *a, **k: pytest.fail('complete cache recomputed'))
  again = evaluation.cached_reference_stats(path, source, extractor)
  np.testing.assert_array_equal(again.sigma_spatial, stats.sigma_spatial)

  # A given stats file without them (e.g. pytorch-fid's): only fid, and a warning.
  user = str(tmp_path / 'user_stats.npz')
  np.savez(user, mu=fid_only.mu, sigma=fid_only.sigma)
  reference = evaluation.metrics.load_reference(user)
  assert evaluation.metrics.metric_names(extractor, reference) == ['fid']
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='atdiff_jax.evaluation.metrics'):
    result = evaluation.compute_metrics(images, reference, extractor)
  assert list(result) == ['fid'] and result['fid'] == pytest.approx(0.0, abs=1e-8)
  assert 'sfid, precision, recall' in caplog.text


def test_probe_mode_writes_every_table(trained):
  workdir, config, _ = trained
  config = copy.deepcopy(config)
  probe = config.probe
  probe.num_samples, probe.radii, probe.attack_steps = BATCH, (0.1,), 1
  probe.attack_at, probe.num_timesteps = ('all',), 2
  bad = copy.deepcopy(config)
  bad.probe.attack_at = (NFE,)
  with pytest.raises(config_lib.ConfigError, match=r'config\.probe\.attack_at'):
    evaluation.probe_mode(workdir, bad)

  evaluation.probe_mode(workdir, config)
  probe_dir = os.path.join(workdir, 'probe')
  stem = os.path.join(probe_dir, f'mismatch_dpm_solver++_nfe{NFE}')
  for path in [f'{stem}.{ext}' for ext in ('json', 'csv', 'md', 'png')] + [
      os.path.join(probe_dir, f'robust_{name}.{ext}')
      for name in ('denoising', 'sampling') for ext in ('json', 'csv', 'md')]:
    assert os.path.isfile(path), path

  def rows(path):
    with open(path) as f:
      return json.load(f)['rows']

  steps = rows(f'{stem}.json')
  assert [r['step'] for r in steps] == list(range(NFE))
  assert all(np.isfinite(r['err_sampler']) and r['err_q'] > 0 for r in steps)
  denoising = rows(os.path.join(probe_dir, 'robust_denoising.json'))
  assert [r['t'] for r in denoising] == [0, config.diffusion.num_timesteps - 1]
  assert all(r['adversarial'] >= r['clean'] for r in denoising)
  sampled = rows(os.path.join(probe_dir, 'robust_sampling.json'))
  assert [(r['radius'], r['at']) for r in sampled] == [(0.0, 'none'), (0.1, 'all')]
  assert all(np.isfinite(r['fd_digits']) for r in sampled)
  assert sampled[0]['fd_digits'] != sampled[1]['fd_digits']


def test_consistency_times_must_fit_every_nfe():
  config = _eval_config()
  config.eval.samplers, config.eval.nfes = ('consistency',), (1, 2)
  config.eval.sampler_options.consistency.timesteps = (90.0,)
  with pytest.raises(config_lib.ConfigError, match=r'timesteps=\(90.0,\): gives 1 times'):
    eval_settings.validate_eval(config, 'eval', 8)
  config.eval.nfes = (2,)
  config.eval.sampler_options.consistency.timesteps = (40.0, 90.0)
  with pytest.raises(config_lib.ConfigError, match='must decrease strictly'):
    eval_settings.validate_eval(config, 'eval', 8)
  config.eval.sampler_options.consistency.timesteps = (90.0, 40.0)
  eval_settings.validate_eval(config, 'eval', 8)


def test_consistency_times_lie_above_the_runs_t_min():
  config = _eval_config()
  config.objective, config.consistency.t_min = 'ct', 50
  config.eval.samplers, config.eval.nfes = ('consistency',), (2,)
  assert from_config.sampler_defaults(config, 'consistency') == {
      'sigma_max': float(config.consistency.sigma_max), 't_min': 50.0}
  assert from_config.sampler_defaults(config, 'ddim') == {}
  # At or below t_min the consistency function is the identity.
  config.eval.sampler_options.consistency.timesteps = (90.0, 40.0)
  with pytest.raises(config_lib.ConfigError, match=r'within \(50, 99\]'):
    eval_settings.validate_eval(config, 'eval', 8)
  config.eval.sampler_options.consistency.timesteps = (90.0, 60.0)
  eval_settings.validate_eval(config, 'eval', 8)
  config.eval.sampler_options.consistency.timesteps = ()
  config.eval.sampler_options.consistency.sigma_max = 0.5  # sigma~ of t = 50 is about 1
  with pytest.raises(config_lib.ConfigError, match=r'sigma_max=0.5: must be above sigma~'):
    eval_settings.validate_eval(config, 'eval', 8)
