"""Consistency-model settings shared by the *_cd and *_ct configs (the formulas:
atdiff_jax/objectives/cm.py)."""


def _sample_with_consistency(config):
  """Preview, sampling and the eval sweep use the consistency sampler at 1, 2 and 4 steps."""
  config.training.timestep_sampler = 'uniform'  # the pairs come from config.consistency
  config.training.sample_steps = 2
  config.eval.sampler = 'consistency'
  config.eval.nfe = 1
  config.eval.samplers = ('consistency',)
  config.eval.nfes = (1, 2, 4)
  return config


def distillation(config, teacher=''):
  """CD from a DPM run (`--config.teacher=RUN`): the student starts as the teacher's EMA
  weights; Heun teacher steps on an 18-point Karras grid (CM's CIFAR-10 CD), the target is
  the student itself (mu = 0), LCM-style scalings (c_skip ~ 0 off the boundary, so the
  student can undo a perturbation of its input: what AT asks of it)."""
  config.objective = 'cd'
  config.teacher = teacher
  cm = config.consistency
  cm.scalings = 'lcm'
  cm.pairs = 'grid'
  cm.grid = 'karras'
  cm.num_points = 18
  cm.skip = 1
  cm.teacher_solver = 'heun'
  cm.target_ema = 0.0
  cm.distance = 'pseudo_huber'  # LPIPS would need downloaded weights; iCT's choice instead
  cm.weighting = 'uniform'
  return _sample_with_consistency(config)


def easy_consistency_tuning(config):
  """ECT: CT whose pairs start far apart and close in by half each stage; start it from a
  DPM run with --config.init_from=RUN (its EMA weights), or from scratch without."""
  config.objective = 'ct'
  cm = config.consistency
  cm.scalings = 'lcm'
  cm.pairs = 'ect'
  cm.p_mean, cm.p_std = -1.1, 2.0
  cm.target_ema = 0.0
  cm.distance = 'l2'
  cm.weighting = 'inverse_gap'
  return _sample_with_consistency(config)


def quickstart_budget(config):
  """The quickstart CM runs' budget: 900 updates at lr 2e-4, scored on 512 samples."""
  config.training.num_steps = 900
  config.training.lr = 2e-4
  config.training.log_every = 100
  config.training.checkpoint_every = 300
  config.training.sample_every = 900
  config.eval.num_samples = 512
  config.probe.num_samples = 512
  return config
