"""What the train step needs to know of a training objective, and nothing more.

The compiled step (`train_step.py`) and the AT replays (`replay.py`: `config.adv.method`
none | free | pgd | fgsm) work with any `Objective`. An objective says:
- `init_state(params)`: what it keeps in `TrainState.objective_state` (the DPM's timestep-
  sampler loss history; a consistency model's target params), checkpointed with the rest;
- `frozen_shapes()` / `load_frozen(mesh)`: read-only extras the loss needs (a teacher's
  params), loaded once on the host and passed to every step call as an argument, never
  baked into the compiled program as constants;
- `draw(...)`: a minibatch's per-example randomness, from keys that depend on the global
  example index only (so the draw is the same on any number of devices), plus anything
  computed once per minibatch rather than once per AT pass (a teacher's ODE step);
- `loss_fn(params, batch, delta, rng) -> (loss, aux)`: pure; `delta` (or None) shifts the
  network's input, `aux['losses']` holds the per-example losses;
- `perturb_mask(batch)`: 1 for the examples whose input AT may perturb;
- `input_sigma(batch)`: the noise level sigma_t of each example's perturbed input (for a
  radius that scales with it, `config.adv.radius_schedule = 'sigma'`);
- `after_update(objective_state, params, batch, aux)`: what follows each optimizer update
  (the timestep sampler's update; the target network's EMA). It runs inside the per-device
  body and may use collectives over the mesh axis.
"""
from __future__ import annotations

import abc
from typing import Any

import jax
from jax.sharding import Mesh

Batch = dict[str, Any]


class Objective(abc.ABC):
  """A training objective; subclasses are built by `objectives.get_objective(config, model)`."""

  # Where a run's starting weights come from when config.init_from (or the teacher) gives
  # them: 'params' (the source run's training params, as the paper's AT fine-tuning) or
  # 'ema' (its first EMA tree, the weights a distillation student starts from).
  init_params_from: str = 'params'
  # Keys each example's draw takes (`draw`'s `keys`); the step splits one more for delta's
  # start after them, so the count fixes every number a run draws. Set by each objective.
  num_draw_keys: int

  def init_state(self, params: Any) -> Any:
    """The objective's slot of the train state for initial `params`; () when stateless."""
    del params
    return ()

  def frozen_shapes(self) -> Any:
    """ShapeDtypeStructs of the frozen extras (a pytree); () when there are none."""
    return ()

  def load_frozen(self, mesh: Mesh) -> Any:
    """The frozen extras, replicated over `mesh`; () when there are none."""
    del mesh
    return ()

  def init_frozen(self, params: Any) -> Any:
    """Stand-in frozen extras built from the student's `params` (same architecture):
    for benchmarks and tests, where no teacher run exists."""
    del params
    return ()

  @property
  def default_init_from(self) -> str:
    """The run whose weights a fresh run starts from when config.init_from is empty."""
    return ''

  @abc.abstractmethod
  def draw(self, objective_state: Any, frozen: Any, images: jax.Array, labels: jax.Array,
           keys: jax.Array, opt_step: jax.Array) -> Batch:
    """This device's minibatch for `loss_fn`: images (B, H, W, C) in [-1, 1], labels (B,),
    keys (B, num_draw_keys) of each example's own, and the number of optimizer
    updates made so far."""

  @abc.abstractmethod
  def loss_fn(self, params: Any, batch: Batch, delta: jax.Array | None,
              rng: jax.Array) -> tuple[jax.Array, dict]:
    """The pure loss of one pass; rng drives dropout."""

  # config.adv.t_range resolved (config.perturbed_t_range); set by each objective.
  perturbed_t_range: tuple[int, int]

  def perturb_mask(self, batch: Batch) -> jax.Array:
    """(B,) float: 1 where AT may perturb the example's input, the examples whose time
    batch['t'] lies in `perturbed_t_range`."""
    t_min, t_max = self.perturbed_t_range
    return ((batch['t'] >= t_min) & (batch['t'] <= t_max)).astype(batch['x0'].dtype)

  @abc.abstractmethod
  def input_sigma(self, batch: Batch) -> jax.Array:
    """(B,) float: the noise standard deviation sigma_t in the input that AT perturbs."""

  def after_update(self, objective_state: Any, params: Any, batch: Batch,
                   aux: dict) -> Any:
    """The objective's state after an optimizer update that produced `params`."""
    del params, batch, aux
    return objective_state
