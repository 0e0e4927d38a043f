"""The AT-vs-standard experiment: its arms, its statistics and one tiny run end to end."""
import json
import math
import os

import numpy as np
import pytest

import conftest
from atdiff_jax import adversarial
from atdiff_jax.experiments import arms as arms_lib
from atdiff_jax.experiments import plateau, regimes, runner
from atdiff_jax.experiments import summary as summary_lib
from atdiff_jax import workers as workers_lib
from atdiff_jax.config import updates_per_minibatch


def _flat(config, prefix=''):
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out |= _flat(value, f'{prefix}{key}.')
    else:
      out[f'{prefix}{key}'] = value
  return out


def test_arms_differ_from_standard_only_in_the_perturbation_and_the_minibatch_count():
  base = conftest.tiny_config()
  standard = _flat(arms_lib.arm_config(base, arms_lib.STANDARD, 1, 12, 1e-4, '/base'))
  schedule = ('training.num_steps', 'training.log_every', 'training.checkpoint_every')
  for arm in list(arms_lib.ARMS.values()) + list(arms_lib.CM_ARMS.values()):
    config = arms_lib.arm_config(base, arm, 1, 12, 1e-4, '/base')
    assert config.training.num_steps * updates_per_minibatch(config) == 12, arm.name
    assert (config.seed, config.init_from, config.training.lr) == (1, '/base', 1e-4)
    # A run killed outright loses at most a quarter of its minibatches.
    assert config.training.checkpoint_every <= max(1, config.training.num_steps // 4)
    differ = {k for k, v in _flat(config).items() if standard[k] != v}
    assert all(k.startswith(('adv.', 'input_perturbation.')) or k in schedule
               or k == 'consistency.target_at' for k in differ), (arm.name, differ)
    assert (differ != set()) == (arm.name not in ('standard', 'cd')), arm.name


def test_arm_names_and_budgets_are_checked():
  assert [a.name for a in arms_lib.resolve_arms(['free_r0.1', 'ip'])] == [
      'standard', 'free_r0.1', 'ip']
  with pytest.raises(ValueError, match='unknown arm'):
    arms_lib.resolve_arms(['free_r0.3'])
  with pytest.raises(ValueError, match='not a whole number of minibatches'):
    arms_lib.arm_config(conftest.tiny_config(), arms_lib.ARMS['free_r0.1'], 0, 10, 1e-4, '/b')


def _stats(values):
  return {'mean': float(np.mean(values)), 'std': float(np.std(values, ddof=1)),
          'n': len(values)}


def test_verdict_needs_a_gap_beyond_the_seed_spread():
  base = _stats([10.0, 10.5, 9.5])
  assert summary_lib.compare(_stats([8.0, 8.2, 7.8]), base)[0] == summary_lib.BETTER
  assert summary_lib.compare(_stats([12.0, 12.2, 11.8]), base)[0] == summary_lib.WORSE
  # 0.8 lower, but the spreads make that indistinguishable (2 standard errors ~ 1.15).
  assert summary_lib.compare(_stats([9.2, 9.7, 8.7]), base)[0] == summary_lib.TIE
  one = {'mean': 1.0, 'std': math.nan, 'n': 1}
  assert summary_lib.compare(one, base)[0] == summary_lib.UNKNOWN


def _result(arm, seed, ddim5, ddim10):
  return {'arm': arm, 'seed': seed, 'metric': 'fd_digits',
          'scores': {'ddim NFE 5': ddim5, 'ddim NFE 10': ddim10},
          'mismatch': {'err_sampler': 0.1 + seed / 100, 'err_q': 0.05}}


def test_summary_table_marks_better_and_worse_cells(tmp_path):
  results = [_result('standard', s, 40 + s, 20 + s) for s in range(3)]
  results += [_result('free_r0.1', s, 30 + s, 25 + s) for s in range(3)]
  summary = summary_lib.summarize(results, ['standard', 'free_r0.1'])
  cells = summary['arms']['free_r0.1']
  assert cells['ddim NFE 5']['verdict'] == summary_lib.BETTER
  assert cells['ddim NFE 10']['verdict'] == summary_lib.WORSE
  assert cells['mismatch err_sampler']['verdict'] == summary_lib.TIE
  assert cells['ddim NFE 5']['mean'] == 31 and cells['ddim NFE 5']['std'] == 1
  markdown = summary_lib.to_markdown(summary, {'seeds': '0, 1, 2'})
  assert '**31 ± 1**' in markdown and '_26 ± 1_' in markdown
  assert 'beats standard at: ddim NFE 5; worse at: ddim NFE 10.' in markdown
  # Paired by seed: free - standard is exactly -10 at NFE 5 and +5 at NFE 10 for every seed.
  assert cells['ddim NFE 5']['paired'] == {'mean': -10, 'std': 0, 'n': 3,
                                           'values': [-10, -10, -10]}
  assert '| free_r0.1 | -10 ± 0 | +5 ± 0 |' in markdown
  assert summary_lib.plot(summary, str(tmp_path / 'plot.png'))
  assert (tmp_path / 'plot.png').stat().st_size > 1000


def test_experiment_runs_resumes_and_reports(tmp_path, capsys, monkeypatch):
  # One seed keeps this affordable; the statistics over seeds are tested above.
  config = conftest.tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.diffusion.num_timesteps = 20
  workdir = str(tmp_path / 'exp')
  kwargs = dict(arm_names=['free_r0.1'], seeds=(3,), updates=3, lr=1e-2, samplers=('ddim',),
                nfes=(2,), num_samples=16, eval_batch=16, probe=('ddim', 2))
  summary = runner.run_experiment(config, workdir, **kwargs)
  assert list(summary['arms']) == ['standard', 'free_r0.1']
  scores = {}
  for arm in ('standard', 'free_r0.1'):
    with open(os.path.join(workdir, 'arms', arm, 'seed3', 'result.json')) as f:
      result = json.load(f)
    assert result['updates'] == 3 and result['seed'] == 3
    scores[arm] = result['scores']['ddim NFE 2']
    assert np.isfinite(scores[arm]) and result['mismatch']['err_q'] > 0
    assert summary['arms'][arm]['ddim NFE 2']['values'] == [scores[arm]]
  assert scores['standard'] != scores['free_r0.1']  # the arms trained differently
  assert summary['arms']['free_r0.1']['ddim NFE 2']['verdict'] == summary_lib.UNKNOWN
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['summary'] == json.loads(json.dumps(summary))
  assert os.path.isfile(os.path.join(workdir, 'fd_digits_vs_nfe.png'))
  assert 'AT vs standard' in open(os.path.join(workdir, 'results.md')).read()

  capsys.readouterr()
  again = runner.run_experiment(config, workdir, **kwargs)  # all done: nothing runs
  out = capsys.readouterr().out
  assert out.count('done earlier, skipped') == 2
  assert json.dumps(again) == json.dumps(summary)

  # The same runs side by side, each in a worker on its own core(s), from the same base.
  cores = workers_lib.available_cores()
  if len(cores) < 2:  # a one-core machine: both share it
    monkeypatch.setattr(workers_lib, 'available_cores', lambda: cores * 2)
  side_by_side = runner.run_experiment(config, str(tmp_path / 'exp2'), workers=2,
                                       base=os.path.join(workdir, 'base'), **kwargs)
  assert 'runs, 2 side by side' in capsys.readouterr().out
  for arm in ('standard', 'free_r0.1'):
    assert side_by_side['arms'][arm]['ddim NFE 2']['values'] == pytest.approx(
        summary['arms'][arm]['ddim NFE 2']['values'], rel=1e-6)


def test_plateau_rule_stops_after_patience_checks_without_gain():
  rule = plateau.PlateauRule(patience=2, min_gain=0.05)
  assert plateau.stop_index([100, 60, 40, 39, 38.5], rule) == 4  # 39 and 38.5: < 5% gain
  assert plateau.stop_index([100, 60, 40, 39, 30], rule) is None  # 30: a gain again
  assert plateau.stop_index([100, 60, 40, 45, 41], rule) == 4  # worse counts as no gain
  assert plateau.stop_index([100], rule) is None
  with pytest.raises(ValueError, match='min_gain'):
    plateau.PlateauRule(min_gain=1.5).check()


def test_fine_tuning_updates_cover_the_base_in_whole_minibatches_of_every_arm():
  base = conftest.tiny_config()
  arms = arms_lib.resolve_arms(arms_lib.PAPER_ARMS)  # free AT: 3 updates per minibatch
  assert runner.fine_tune_updates(1000, 1.0, arms, base) == 1002
  assert runner.fine_tune_updates(1000, 2.4, arms, base) == 2400
  assert runner.fine_tune_updates(10, 1.0, [arms_lib.STANDARD], base) == 10


def test_regimes_fix_arms_seeds_and_budgets_in_advance():
  paper = regimes.REGIMES['paper']
  seeds = paper.seeds_by_arm(paper.seeds, paper.few_seeds)
  assert seeds == {'standard': (0, 1, 2, 3, 4),
                   'free_1x': (0, 1, 2, 3, 4), 'free_2x': (0, 1, 2)}
  assert paper.updates_ratio >= 1.0 and paper.base_rule is not None
  free_1x, free_2x = arms_lib.ARMS['free_1x'], arms_lib.ARMS['free_2x']
  config = conftest.tiny_config()
  balls = []
  for arm in (free_1x, free_2x):
    arm_config = arms_lib.arm_config(config, arm, 0, 3, 1e-4, '/b')
    balls.append(adversarial.BallSpec.from_config(arm_config.adv, (8, 8, 1)))
  # The paper's per-pixel step on 8x8x1: 0.1 / sqrt(3072) * 8, and twice that.
  assert balls[0].step_size == pytest.approx(0.1 / math.sqrt(3072) * 8)
  assert balls[1].step_size == pytest.approx(2 * balls[0].step_size)
  cd = regimes.REGIMES['cd']
  assert cd.reference == 'cd' and set(cd.arms) == set(arms_lib.CM_ARMS) and cd.needs_base
  assert all(len(s) == 3 for s in cd.seeds_by_arm(cd.seeds, cd.few_seeds).values())


def test_paper_regime_trains_the_base_to_its_plateau_and_scores_it_as_an_arm(tmp_path):
  config = conftest.tiny_config()
  config.model.ch_mult, config.model.attn_resolutions = (1,), ()
  config.diffusion.num_timesteps = 20
  workdir = str(tmp_path / 'exp')
  rule = plateau.PlateauRule(check_every=2, max_minibatches=6, patience=1, min_gain=0.99,
                             nfe=2, num_samples=16)
  summary = runner.run_experiment(
      config, workdir, arm_names=['base', 'free_1x'], seeds=(0,), updates_ratio=1.0,
      lr=1e-2, samplers=('ddim',), nfes=(2,), num_samples=16, eval_batch=16, probe=None,
      base_rule=rule)
  with open(os.path.join(workdir, 'base', plateau.CURVE_JSON)) as f:
    curve = json.load(f)
  # min_gain 0.99: the second check cannot gain enough, so the rule stops there.
  assert [c['minibatch'] for c in curve['checks']] == [2, 4] and curve['stopped_at'] == 4
  assert os.path.isfile(os.path.join(workdir, 'base', plateau.CURVE_PNG))
  with open(os.path.join(workdir, 'arms', 'base', 'result.json')) as f:
    base = json.load(f)
  assert base['updates'] == 0 and base['seed'] is None
  with open(os.path.join(workdir, 'arms', 'free_1x', 'seed0', 'result.json')) as f:
    assert json.load(f)['updates'] == 6  # the base's 4, in whole free-AT minibatches
  cell = summary['arms']['free_1x']['ddim NFE 2']
  assert cell['diff_base'] == pytest.approx(cell['mean'] - base['scores']['ddim NFE 2'])
  assert 'paper-style' in open(os.path.join(workdir, 'results.md')).read()


def test_timestep_mass_reads_the_samplers_probabilities_and_losses():
  from atdiff_jax.experiments.timestep_mass import mass_below  # pylint: disable=g-import-not-at-top
  probs = np.full(1000, 0.5 / 900)
  probs[:100] = 0.5 / 100  # half the mass on the first tenth
  history = np.ones((1000, 10))
  history[:100] = 3.0
  row = mass_below(probs, history)
  assert row['p(t<100)'] == pytest.approx(0.5) and row['p(t<50)'] == pytest.approx(0.25)
  assert row['p(t<250)'] == pytest.approx(0.5 + 150 * 0.5 / 900)
  assert row['rms loss t<100'] == pytest.approx(3.0)
  assert row['rms loss, all t'] == pytest.approx(0.1 * 3 + 0.9 * 1)
