"""Gaussian diffusion math: schedules, forward/posterior, losses, timestep samplers."""
import ml_collections
import numpy as np

from atdiff_jax.diffusion.gaussian import GaussianDiffusion
from atdiff_jax.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
    vb_terms_bits,
)
from atdiff_jax.diffusion.schedules import SCHEDULES, get_beta_schedule
from atdiff_jax.diffusion.timestep_sampler import (
    TIMESTEP_SAMPLERS,
    LossSecondMomentState,
    TimestepSampler,
    init_loss_second_moment,
    is_warm,
    loss_second_moment_probs,
    make_timestep_sampler,
    sample_loss_second_moment,
    sample_uniform,
    update_loss_second_moment,
)



def betas_of(config: ml_collections.ConfigDict) -> np.ndarray:
  """The run's beta schedule (float64, config.diffusion), as samplers and processes take it."""
  return get_beta_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def diffusion_of(config: ml_collections.ConfigDict) -> GaussianDiffusion:
  """The run's discrete diffusion process (config.diffusion)."""
  return GaussianDiffusion.create(betas_of(config))


__all__ = [
    'GaussianDiffusion',
    'betas_of',
    'diffusion_of',
    'LossSecondMomentState',
    'SCHEDULES',
    'TIMESTEP_SAMPLERS',
    'TimestepSampler',
    'approx_standard_normal_cdf',
    'discretized_gaussian_log_likelihood',
    'get_beta_schedule',
    'hybrid_loss',
    'init_loss_second_moment',
    'is_warm',
    'loss_second_moment_probs',
    'make_timestep_sampler',
    'normal_kl',
    'sample_loss_second_moment',
    'sample_uniform',
    'update_loss_second_moment',
    'vb_terms_bits',
]
