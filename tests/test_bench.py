"""Benchmark smoke test: result structure and reporting (speed is never asserted)."""
import pytest

from atdiff_jax.bench import (Variant, bench_dispatch, bench_sweep, bench_train,
                              format_dispatch_table, format_fid_table,
                              format_sweep_table, format_train_table, parse_variants,
                              variant_config)
from conftest import ToyDenoiser, tiny_config


def test_parse_variants():
  assert parse_variants('free:3, pgd:1,fgsm') == (
      Variant('none'), Variant('free', 3), Variant('pgd', 1), Variant('fgsm'))
  assert [v.name for v in parse_variants('none,pgd:3')] == ['none', 'pgd K=3']
  for bad in ('bogus', 'free', 'pgd:0', 'fgsm:2', 'free:x', 'free:3@scan', 'none@remat=all'):
    with pytest.raises(ValueError):
      parse_variants(bad)


def test_parse_variant_options():
  variants = parse_variants('free:3@rolled,none@remat=blocks,pgd:2@unrolled@remat=attention')
  assert variants == (Variant('none'), Variant('free', 3, loop='rolled'),
                      Variant('none', remat='blocks'),
                      Variant('pgd', 2, loop='unrolled', remat='attention'))
  assert [v.name for v in variants[1:]] == [
      'free K=3 (rolled)', 'none (remat blocks)', 'pgd K=2 (unrolled, remat attention)']
  assert [v.passes for v in variants] == [1, 3, 1, 3]
  derived = variant_config(tiny_config(), variants[3])
  assert (derived.adv.replay_loop, derived.model.remat) == ('unrolled', 'attention')


def test_variant_config_changes_only_adv():
  config = tiny_config()
  derived = variant_config(config, Variant('free', 5))
  assert (derived.adv.method, derived.adv.steps) == ('free', 5)
  assert (config.adv.method, config.adv.steps) == ('none', 3)  # the original is untouched
  derived.adv.method, derived.adv.steps = config.adv.method, config.adv.steps
  assert derived.to_dict() == config.to_dict()


def test_bench_train_structure():
  config = tiny_config()
  k = 2
  # The stand-in denoiser compiles in about a second; the U-Net's speed is not under test.
  result = bench_train(config, (Variant('none'), Variant('free', k)), steps=1, warmup=1,
                       repeats=2, model=ToyDenoiser())
  assert result['batch_size'] == config.training.batch_size
  assert result['num_params'] > 0
  none, free = result['variants']
  assert [none['name'], free['name']] == ['none', f'free K={k}']
  assert none['updates_per_call'] == 1 and free['updates_per_call'] == k
  for metric, ratio in none['ratio_to_none'].items():
    assert ratio == 1.0, metric
  for row in (none, free):
    for key in ('compile_s', 's_per_call', 's_per_update', 'images_per_s', 'updates_per_s'):
      assert row[key] > 0, key
    assert len(row['round_s_per_call']) == 2
    assert row['s_per_call'] == min(row['round_s_per_call'])
    assert row['s_per_update'] == pytest.approx(row['s_per_call'] / row['updates_per_call'])
    assert row['images_per_s'] == pytest.approx(config.training.batch_size / row['s_per_call'])
    assert row['peak_memory']['bytes'] > 0
    assert row['xla_memory']['footprint_bytes'] > 0
  assert free['ratio_to_none']['s_per_call'] == pytest.approx(
      free['s_per_call'] / none['s_per_call'])
  # free makes k updates per call: its per-update time is its per-call time over k.
  assert free['ratio_to_none']['updates_per_s'] == pytest.approx(
      k * none['s_per_call'] / free['s_per_call'])

  # MFU needs a FLOP count (XLA:CPU has one) and a peak: none for CPUs unless given.
  assert result['model_flops_per_image'] > 0 and result['peak_flops_per_device'] is None
  assert none['mfu'] is None and none['xla_flops_per_call'] > 0
  # free K=2 does twice the passes of none: twice its model FLOPs per call.
  assert free['model_flops_per_s'] * free['s_per_call'] == pytest.approx(
      2 * none['model_flops_per_s'] * none['s_per_call'])

  table = format_train_table(result).splitlines()
  assert table[0].startswith('| AT variant |')
  assert table[2].startswith('| none | 1 |') and table[2].count('(1.00×)') == 4
  assert table[3].startswith(f'| free K={k} | {k} |')
  assert all(line.count('|') == table[0].count('|') for line in table[1:4])


def test_bench_train_needs_none_first():
  with pytest.raises(ValueError, match='none'):
    bench_train(tiny_config(), (Variant('free', 2),), steps=1, warmup=0)


def test_mfu_uses_the_given_peak_and_the_remat_variant_its_own_model():
  config = tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  result = bench_train(config, (Variant('none'), Variant('none', remat='blocks')), steps=1,
                       warmup=1, repeats=1, peak_tflops=0.001)
  none, remat = result['variants']
  assert result['peak_flops_per_device'] == 1e9
  assert none['mfu'] == pytest.approx(none['model_flops_per_s'] / 1e9)
  assert (none['remat'], remat['remat']) == ('none', 'blocks')
  assert remat['name'] == 'none (remat blocks)' and remat['passes_per_call'] == 1
  assert '%' in format_train_table(result).splitlines()[2]


def test_fid_table():
  row = format_fid_table({
      'sampler': 'dpm_solver++', 'nfe': 10, 'num_samples': 10_000, 'batch_size': 1000,
      'weights': 'random', 'compile_s': 12.3, 'seconds': 8.0, 'images_per_s': 1250.0,
      'extrapolated_50k_s': 40.0, 'fid': 1.0,
      'peak_memory': {'kind': 'device_peak', 'bytes': 2**30}}).splitlines()[2]
  assert row == ('| dpm_solver++ NFE 10 + Inception (random weights) | 10,000 | 1000 | 12.3 | '
                 '8.0 | 1,250 | 40 | 1,024.0 |')


def test_bench_sweep_scores_every_run_both_ways_and_reports_the_total():
  config = tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.diffusion.num_timesteps = 20
  config.eval.update(samplers=('ddim',), nfes=(2,), eps_scales=(1.0,), batch_size=8)
  result = bench_sweep(config, num_runs=2, num_samples=8)
  assert result['cells'] == ['ddim NFE 2'] and result['num_runs'] == 2
  assert len(result['per_run_s']) == len(result['once_s']) == 2
  assert all(t > 0 for t in result['per_run_s'] + result['once_s'])
  table = format_sweep_table({'cells': ['ddim NFE 2'], 'num_samples': 8, 'num_runs': 3,
                              'per_run_s': [10.0, 4.0, 4.0], 'once_s': [2.0, 2.0, 2.0]})
  assert '| 2 | 4.0 | 2.0 | 2.00x |' in table
  assert '18.0 s before, 14.0 s now (1.29x)' in table  # 10 + 4 + 4 against 10 + 2 + 2


def test_bench_dispatch_times_each_count_over_the_real_state():
  """The dispatch part's rows, per minibatch count; the state passes through untouched."""
  config = tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  result = bench_dispatch(config, per_call=(4, 1), calls=2, repeats=1)
  assert [(r['minibatches_per_call'], r['scan']) for r in result['rows']] == [
      (1, False), (1, True), (4, True)]
  assert result['state_arrays'] > 50  # params, Adam moments, EMA, counters
  for row in result['rows']:
    assert row['ms_per_call'] > 0
    assert row['ms_per_minibatch'] == pytest.approx(row['ms_per_call'] / row['minibatches_per_call'])
  assert result['rows'][0]['floor_ratio'] == 1.0
  table = format_dispatch_table({'state_arrays': 1979, 'calls': 20, 'repeats': 3, 'rows': [
      {'minibatches_per_call': 1, 'scan': False, 'ms_per_call': 8.0, 'ms_per_minibatch': 8.0,
       'floor_ratio': 1.0},
      {'minibatches_per_call': 8, 'scan': True, 'ms_per_call': 9.6, 'ms_per_minibatch': 1.2,
       'floor_ratio': 8.0 / 1.2}]})
  assert '| 1 (plain) | 8.00 | 8.000 | baseline |' in table
  assert '| 8 (scan) | 9.60 | 1.200 | 6.7x lower |' in table and '1,979 arrays' in table
  with pytest.raises(ValueError, match='>= 1'):
    bench_dispatch(config, per_call=(0,))


def test_bench_side_by_side_times_one_process_then_every_worker_at_once(monkeypatch):
  from atdiff_jax import workers  # pylint: disable=g-import-not-at-top
  from atdiff_jax.bench import bench_side_by_side, format_side_by_side_table  # pylint: disable=g-import-not-at-top
  cores = workers.available_cores()
  if len(cores) < 2:  # a one-core machine: both workers share it
    monkeypatch.setattr(workers, 'available_cores', lambda: cores * 2)
  config = tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  result = bench_side_by_side(config, 2, steps=1, warmup=1, repeats=2)
  side = result['side_by_side']
  assert len(side) == 2 and len(result['one_process']['round_s_per_call']) == 2
  shares = workers.core_shares(workers.available_cores(), 2)
  if not workers.WorkerSetup.of_this_process().pin:  # simulated devices: workers unpinned
    shares = [workers.available_cores()] * 2
  assert [r['cores'] for r in side] == [sorted(set(s)) for s in shares]
  assert result['total_images_per_s'] == pytest.approx(sum(r['images_per_s'] for r in side))
  assert result['ratio'] == pytest.approx(
      result['total_images_per_s'] / result['one_process']['images_per_s'])
  table = format_side_by_side_table({
      'batch_size': 64, 'steps': 20, 'repeats': 3, 'ratio': 1.5, 'total_images_per_s': 900.0,
      'one_process': {'cores': [0, 1], 'images_per_s': 600.0},
      'side_by_side': [{'cores': [0], 'images_per_s': 450.0},
                       {'cores': [1], 'images_per_s': 450.0}]})
  assert '| 1 | 2 | 600 | 600 | 1.00x |' in table
  assert '| 2 | 1 | 450, 450 | 900 | 1.50x |' in table
