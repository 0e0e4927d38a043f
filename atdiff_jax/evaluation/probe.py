"""`--mode=probe`: the mismatch and robustness probes of one checkpoint, into RUN/probe/.

Settings: the sampler of `config.eval` (sampler, nfe, eps_scale, sampler_options) and the
`config.probe` block. Files (each as .json, .csv and .md, plus a PNG where it helps):
- mismatch_<sampler>_nfe<N>: per sampler step, the eps-error on the sampler's x_t and on
  q(x_t | x0), their gap, and the eps mean squares (see `evaluation.mismatch`);
- robust_denoising: per t and radius, the eps-error at x_t ~ q, clean and under attack;
- robust_sampling: the eval metrics of samples whose x_t was attacked at the given steps
  (radius 0: the clean baseline, with the same seed).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from atdiff_jax import config as config_lib
from atdiff_jax import data
from atdiff_jax.evaluation import mismatch as mismatch_lib
from atdiff_jax.evaluation import probe_report
from atdiff_jax.evaluation import robustness
from atdiff_jax.evaluation import settings as eval_settings
from atdiff_jax.evaluation import run as run_lib
from atdiff_jax.evaluation.sweep import Metric, score_samples, setup_metrics

PROBE_DIR = 'probe'
PROBES = ('mismatch', 'robustness')
Row = dict[str, Any]


def validate_probe(config: ml_collections.ConfigDict, nfe: int) -> None:
  """Checks `config.probe` before anything compiles."""
  if 'probe' not in config:
    raise config_lib.ConfigError('config.probe is missing (a run trained before it existed): '
                                 'pass --config=<the config file the run was trained with>')
  probe = config.probe

  def fail(field, why):
    config_lib.fail(f'probe.{field}', probe[field], why)

  if not tuple(probe.run) or set(probe.run) - set(PROBES):
    fail('run', f'must name some of {", ".join(PROBES)}')
  for field in ('num_samples', 'attack_steps', 'num_timesteps'):
    value = probe[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      fail(field, 'must be a positive integer')
  if probe.norm not in ('l2', 'linf'):
    fail('norm', "must be 'l2' or 'linf'")
  radii = tuple(probe.radii)
  if not radii or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0
                      for r in radii):
    fail('radii', 'must be one or more numbers > 0 (per-pixel units, as config.adv.radius)')
  if not tuple(probe.attack_at):
    fail('attack_at', "must name 'all' and/or sampler step indices")
  for at in probe.attack_at:
    try:
      robustness.resolve_steps(at, nfe)
    except ValueError as e:
      fail('attack_at', str(e))
  if probe.num_timesteps > config.diffusion.num_timesteps:
    fail('num_timesteps', f'exceeds diffusion.num_timesteps={config.diffusion.num_timesteps}')
  if 'mismatch' in probe.run:
    mismatch_lib.check_applies(config)


# ------------------------------------------------------------------ the measurements


def denoising_robustness(run: run_lib.Run, images: np.ndarray, norm: str,
                         radii: Sequence[float], steps: int, timesteps: Sequence[int],
                         batch_size: int, seed: int = 0, labels: np.ndarray | None = None
                         ) -> list[Row]:
  """Rows (radius, t, clean, adversarial, ratio) of eps-MSEs on uint8 `images` (whole
  batches only; the remainder is dropped)."""
  config = run.config
  image_shape = images.shape[1:]
  num_batches = len(images) // batch_size
  if num_batches < 1:
    raise ValueError(f'need at least one batch of {batch_size} images, got {len(images)}')
  rows = []
  for radius in radii:
    ball = robustness.attack_ball(norm, radius, steps, image_shape)
    fn = robustness.make_denoising_fn(run.model_fn(), run.betas, timesteps, ball, steps,
                                      run.mesh)
    totals = None
    for b in range(num_batches):
      batch = slice(b * batch_size, (b + 1) * batch_size)
      x0 = images[batch].astype(np.float32) / 127.5 - 1.0
      y = None if not config.model.num_classes else labels[batch].astype(np.int32)
      out = jax.device_get(fn(jax.random.fold_in(jax.random.key(seed), b), x0, y, run.params))
      totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
    count = num_batches * batch_size
    for i, t in enumerate(timesteps):
      clean, adv = float(totals['clean'][i]) / count, float(totals['adversarial'][i]) / count
      rows.append({'norm': norm, 'radius': float(radius), 't': int(t), 'clean': clean,
                   'adversarial': adv, 'ratio': adv / max(clean, 1e-12),
                   'num_images': count})
  return rows


def sampling_robustness(run: run_lib.Run, metrics: list[Metric], sampler: str, nfe: int,
                        eps_scale: float, norm: str, radii: Sequence[float],
                        attack_at: Sequence[str | int], steps: int, num_samples: int,
                        batch_size: int, seed: int = 0, progress=None,
                        **opts: Any) -> list[Row]:
  """Rows (radius, at, metrics...) of samples attacked at `attack_at`; radius 0 first."""
  config = run.config
  image_shape = config_lib.image_shape(config)
  settings = [(0.0, 'none')] + [(float(r), at) for r in radii for at in attack_at]
  rows = []
  for radius, at in settings:
    perturb = {}
    if radius > 0:
      ball = robustness.attack_ball(norm, radius, steps, image_shape)
      perturb['perturb_fn'] = robustness.make_sampling_attack(
          ball, steps, robustness.resolve_steps(at, nfe))
    scores = score_samples(run, metrics, num_samples, sampler=sampler, nfe=nfe,
                           eps_scale=eps_scale, batch_size=batch_size, seed=seed, **opts,
                           **perturb)
    row = {'sampler': sampler, 'nfe': nfe, 'eps_scale': eps_scale, 'norm': norm,
           'radius': radius, 'at': str(at), 'num_samples': num_samples}
    row.update({k: v for k, v in scores.items() if k != 'images_per_s'})
    rows.append(row)
    if progress is not None:
      progress(row)
  return rows


def evenly_spaced_timesteps(num_timesteps: int, count: int) -> list[int]:
  """`count` timesteps from 0 to T-1, evenly spaced (rounded)."""
  return sorted({int(round(t)) for t in np.linspace(0, num_timesteps - 1, count)})


# ------------------------------------------------------------------ the command


def probe_mode(workdir: str, override: ml_collections.ConfigDict | None = None) -> None:
  """`--mode=probe`: every probe of `config.probe.run` on one checkpoint, into RUN/probe/."""
  run = run_lib.open_run(workdir, override, 'probe',
                         check=lambda config: validate_probe(config, int(config.eval.nfe)))
  config, ev, probe = run.config, run.config.eval, run.config.probe
  out_dir = os.path.join(run.workdir, PROBE_DIR)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
  say = (lambda msg: print(f'probe: {msg}', flush=True)) if is_main else (lambda msg: None)
  sampler, nfe, eps_scale = ev.sampler, int(ev.nfe), float(ev.eps_scale)
  opts = eval_settings.options_of(ev, sampler)
  batch_size, num_samples, seed = int(ev.batch_size), int(probe.num_samples), int(ev.seed)
  meta = {'workdir': run.workdir, 'step': run.step, 'weights': run.weights_name,
          'sampler': sampler, 'nfe': nfe, 'eps_scale': eps_scale, 'sampler_options': opts}
  say(f'step {run.step} ({run.weights_name}), {sampler} NFE {nfe} λ={eps_scale:g} -> {out_dir}')

  if 'mismatch' in probe.run:
    result = mismatch_lib.measure_mismatch(
        run, sampler, nfe, num_samples, eps_scale, batch_size, seed,
        progress=lambda b, n: say(f'mismatch: batch {b}/{n}'), **opts)
    stem = os.path.join(out_dir, f'mismatch_{sampler}_nfe{nfe}')
    if is_main:
      probe_report.write_table(result.rows(), stem, 'Mismatch probe',
                  meta | {'num_samples': result.num_samples})
      probe_report.plot_mismatch(result, f'{stem}.png')
    say(f'mismatch: wrote {stem}.md')

  if 'robustness' in probe.run:
    norm, radii, steps = probe.norm, tuple(probe.radii), int(probe.attack_steps)
    source = data.create_source(config.data)
    count = min(len(source), max(batch_size, num_samples // batch_size * batch_size))
    indices = np.random.default_rng(seed).permutation(len(source))[:count]
    images, labels = source.get(np.sort(indices))
    timesteps = evenly_spaced_timesteps(config.diffusion.num_timesteps,
                                        int(probe.num_timesteps))
    say(f'robustness: denoising error at {len(timesteps)} timesteps, {count} images')
    rows = denoising_robustness(run, images, norm, radii, steps, timesteps, batch_size, seed,
                                labels)
    stem = os.path.join(out_dir, 'robust_denoising')
    attack = {'norm': norm, 'attack_steps': steps}
    if is_main:
      probe_report.write_table(rows, stem, 'Denoising error under attack',
                  {k: meta[k] for k in ('workdir', 'step', 'weights')} | attack)
      probe_report.plot_denoising(rows, f'{stem}.png')
    say(f'robustness: wrote {stem}.md')
    metrics = setup_metrics(config, run.mesh, out_dir)
    names = [extractor.name for extractor, _ in metrics]

    def progress(row):
      scores = ' | '.join(f'{n} {row[n]:.4g}' for n in names if n in row)
      say(f'robustness: radius {row["radius"]:g} at {row["at"]}: {scores} | '
          f'{row["seconds"]:.1f} s')

    rows = sampling_robustness(run, metrics, sampler, nfe, eps_scale, norm, radii,
                               tuple(probe.attack_at), steps, num_samples, batch_size, seed,
                               progress, **opts)
    stem = os.path.join(out_dir, 'robust_sampling')
    if is_main:
      probe_report.write_table(rows, stem, 'Samples under attack', meta | attack)
    say(f'robustness: wrote {stem}.md')
