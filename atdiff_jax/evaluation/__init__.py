"""Sampling and evaluation of trained runs: the library behind --mode=sample and --mode=eval.

Example: 1k samples at NFE 10 with DPM-Solver++, and their FID against reference stats.

  from atdiff_jax import evaluation
  from atdiff_jax.metrics import load_stats

  run = evaluation.load_run('runs/cifar10_adm')        # latest checkpoint, EMA params
  images = evaluation.generate(run, 1000, sampler='dpm_solver++', nfe=10, seed=0)
  print(images.shape, images.dtype)                    # (1000, 32, 32, 3) uint8

  inception = evaluation.inception_features('inception_fid.msgpack')
  reference = load_stats('inception_fid_cifar10-train-32_stats.npz')
  print(evaluation.compute_metrics(images, reference, inception))  # {'fid': ..., 'is': ...}

For a run on the embedded 8x8 digits, without any weights file (this is fd_digits, the
Frechet distance in a small digits classifier's features; it is NOT the Inception FID):

  from atdiff_jax.data import load_digits_source
  digits = evaluation.digits_features()
  real = evaluation.reference_stats(load_digits_source(), digits)
  print(evaluation.compute_metrics(images, real, digits))          # {'fd_digits': ...}

The probes (also `--mode=probe`): `evaluation.measure_mismatch(run, 'ddim', nfe=10)` compares the
model's eps-error on a sampler's own x_t with its error on x_t ~ q(x_t | x0), step by
step; `denoising_robustness` and `sampling_robustness` measure it under worst-case
perturbations of x_t.

`run.sample_fn(...)` gives the underlying jitted `sample(rng, labels=None)` for one
batch; `evaluation.evaluate(run)` runs the sweep of `run.config.eval` into RUN/eval/.
FID from 1k samples is biased upwards: compare numbers only at equal sample counts
(published ones use 50k). Reference stats of a data set: `reference_stats(source,
inception)` with a source from `atdiff_jax.data.create_source`, or `--mode=eval`, which
computes and caches them.
"""
from atdiff_jax.evaluation.generate import (default_out_dir, generate, load_samples,
                                            sample_batches, sample_mode)
from atdiff_jax.evaluation.metrics import (FeatureExtractor, MetricAccumulator,
                                           cached_reference_stats, compute_metrics,
                                           digits_features, inception_features,
                                           pixel_features, reference_stats)
from atdiff_jax.evaluation.mismatch import MismatchResult, make_mismatch_fn, measure_mismatch
from atdiff_jax.evaluation.probe import (denoising_robustness, probe_mode,
                                         sampling_robustness)
from atdiff_jax.evaluation.report import write_reports
from atdiff_jax.evaluation.robustness import (attack_ball, make_denoising_fn,
                                              make_sampling_attack)
from atdiff_jax.evaluation.run import Run, load_run, open_run
from atdiff_jax.evaluation.settings import options_of, resolve_config, validate_eval
from atdiff_jax.evaluation.sweep import Cell, eval_mode, evaluate, setup_metrics, sweep_cells

__all__ = [
    'Cell', 'FeatureExtractor', 'MetricAccumulator', 'MismatchResult', 'Run', 'attack_ball',
    'cached_reference_stats', 'compute_metrics', 'default_out_dir', 'denoising_robustness',
    'digits_features', 'eval_mode', 'evaluate', 'generate', 'inception_features', 'load_run',
    'load_samples', 'make_denoising_fn', 'make_mismatch_fn', 'make_sampling_attack',
    'measure_mismatch', 'open_run', 'pixel_features', 'probe_mode', 'reference_stats',
    'options_of', 'resolve_config', 'sample_batches', 'sample_mode', 'sampling_robustness',
    'setup_metrics', 'sweep_cells', 'validate_eval', 'write_reports',
]
