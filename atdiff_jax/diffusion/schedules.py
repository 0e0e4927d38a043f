"""Noise schedules (beta_t) for discrete-time Gaussian diffusion."""
import math

import numpy as np

SCHEDULES = ('linear', 'cosine')

# Largest beta the cosine schedule allows; avoids a singularity at t = T.
_MAX_COSINE_BETA = 0.999
# Offset s of the cosine schedule, keeps beta_0 from being vanishingly small.
_COSINE_OFFSET = 0.008


def _cosine_alpha_bar(t: np.ndarray) -> np.ndarray:
  """alpha_bar at continuous time t in [0, 1] (Nichol & Dhariwal 2021)."""
  return np.cos((t + _COSINE_OFFSET) / (1.0 + _COSINE_OFFSET) * math.pi / 2) ** 2


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Returns betas of shape (num_timesteps,) in float64.

  'linear': DDPM's linear schedule, scaled by 1000 / T so that any T matches
    the 1000-step schedule's endpoints in continuous time (as in ADM).
  'cosine': improved DDPM's cosine schedule,
    beta_t = min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), 0.999).
  """
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f'num_timesteps must be a positive integer, got {num_timesteps!r}.')
  if name == 'linear':
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == 'cosine':
    steps = np.arange(num_timesteps, dtype=np.float64)
    ratio = (_cosine_alpha_bar((steps + 1) / num_timesteps) /
             _cosine_alpha_bar(steps / num_timesteps))
    return np.minimum(1.0 - ratio, _MAX_COSINE_BETA)
  raise ValueError(f'Unknown beta schedule {name!r}; allowed values: {", ".join(SCHEDULES)}.')
