"""ADM/improved-DDPM timestep respacing and the constants of the respaced process.

Respacing keeps a subset S of the original timesteps and defines a shorter diffusion whose
alphas_cumprod are the original ones at S: beta'_i = 1 - abar[s_i] / abar[s_{i-1}]. The
model is still called with the original indices s_i.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from atdiff_jax.samplers import common


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
  """The timesteps to keep, as improved-diffusion's `space_timesteps`.

  `section_counts` is a comma-separated string or a list of counts: the T steps are cut
  into len(section_counts) near-equal sections and each is strided evenly to its count
  (e.g. "10,15,20"). "ddimN" instead picks the integer stride that gives exactly N steps,
  as DDIM does (range(0, T, stride)).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith('ddim'):
      desired = int(section_counts[len('ddim'):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return set(range(0, num_timesteps, stride))
      raise ValueError(f'cannot create exactly {desired} steps with an integer stride '
                       f'from {num_timesteps} timesteps.')
    section_counts = [int(c) for c in section_counts.split(',')]
  section_counts = [int(c) for c in section_counts]
  if not section_counts:
    raise ValueError('section_counts must name at least one section.')
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start = 0
  kept = []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f'cannot divide a section of {size} steps into {count}.')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    # Accumulate the fractional index and use Python's round (half to even) so that the
    # kept steps are exactly those of the reference implementation.
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return set(kept)


def resolve_respacing(num_timesteps: int, num_steps: int,
                      respacing: str | Sequence[int] | None) -> np.ndarray:
  """Sorted kept timesteps for `num_steps` steps.

  None: `num_steps` evenly spaced steps (ADM's "--timestep_respacing <num_steps>");
  "ddim": DDIM's integer stride ("ddim<num_steps>"); anything else is passed to
  `space_timesteps` and must produce exactly `num_steps` steps.
  """
  common.check_num_steps(num_steps, num_timesteps)
  if respacing is None:
    respacing = [num_steps]
  elif respacing == 'ddim':
    respacing = f'ddim{num_steps}'
  kept = np.array(sorted(space_timesteps(num_timesteps, respacing)), dtype=np.int64)
  if kept.shape[0] != num_steps:
    raise ValueError(f'respacing {respacing!r} keeps {kept.shape[0]} timesteps, but '
                     f'num_steps={num_steps}.')
  return kept


def respace_betas(betas: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """Betas of the process that visits only the `kept` (sorted) timesteps."""
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))
  kept_abar = alphas_cumprod[kept]
  previous = np.concatenate([[1.0], kept_abar[:-1]])
  return 1.0 - kept_abar / previous


@dataclasses.dataclass(frozen=True)
class RespacedProcess:
  """Float64 constants of a (respaced) discrete Gaussian diffusion, indexed by step i."""
  timestep_map: np.ndarray  # original timestep of respaced step i
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray  # multiplies x0
  posterior_mean_coef2: np.ndarray  # multiplies x_t

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 / self.alphas_cumprod)

  @property
  def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

  def fixed_log_variance(self, kind: str) -> np.ndarray:
    """ADM's fixed variances: 'small' (posterior) or 'large' (betas, first entry clipped)."""
    if kind == 'small':
      return self.posterior_log_variance_clipped
    if kind == 'large':
      if self.num_steps == 1:
        return np.log(self.betas)
      return np.log(np.append(self.posterior_variance[1], self.betas[1:]))
    raise ValueError(f"fixed_variance must be 'small' or 'large', got {kind!r}.")


def respaced_process(betas, num_steps: int,
                     respacing: str | Sequence[int] | None = None) -> RespacedProcess:
  """The respaced process with `num_steps` steps (see `resolve_respacing`)."""
  betas = common.as_betas(betas)
  kept = resolve_respacing(betas.shape[0], num_steps, respacing)
  new_betas = respace_betas(betas, kept)
  alphas = 1.0 - new_betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = new_betas * (1.0 - abar_prev) / (1.0 - abar)
  # The posterior variance is 0 at step 0; like ADM, log it with step 1's value there
  # (it only matters for learned-range interpolation, and step 0 adds no noise).
  if num_steps > 1:
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
  else:
    post_log_var = np.log(new_betas)
  return RespacedProcess(
      timestep_map=kept,
      betas=new_betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=new_betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
  )
