"""The experiment's presets (`--regime`): which arms, seeds, base and budget, fixed in advance.

- `paper`: the paper's regime on any config. A base trained until its fd at DDIM NFE 20
  stops improving (`plateau.PlateauRule`), then every arm fine-tunes for as many optimizer
  updates as the base had (the reference: 2.4x); the arms are the base itself (paper-style
  comparison), standard fine-tuning (the fair baseline) and free AT at the paper's per-pixel
  strength and at twice it. Five training seeds for standard and the paper's strength,
  three for the others.
- `cd`: consistency distillation from a converged DPM base (`--base`, e.g. the paper
  regime's WORKDIR/base) with `--config` a CD config: CD against CD + free AT at the paper's
  per-pixel strength and 2x, the target at the perturbed input, and AT that leaves out the
  smallest timesteps; the same updates for all, 1/2/4 consistency steps, three seeds.
- `short`: the first experiment (absolute AT steps, 7x the paper's per-pixel strength on 8x8
  digits; 300 updates after a base of the config's length).
"""
from __future__ import annotations

import dataclasses

from atdiff_jax.experiments import arms as arms_lib
from atdiff_jax.experiments.plateau import PlateauRule


@dataclasses.dataclass(frozen=True)
class Regime:
  arms: tuple[str, ...]
  seeds: tuple[int, ...]           # of the main arms
  main_arms: tuple[str, ...]       # arms with every seed; the others take the first few
  few_seeds: int
  updates: int | None = None       # optimizer updates per arm, or:
  updates_ratio: float | None = None  # that multiple of the base's updates
  lr: float = 1e-4
  base_rule: PlateauRule | None = None
  known_arms: dict | None = None   # None: the DPM arms
  reference: str = 'standard'
  source_field: str = 'init_from'
  samplers: tuple[str, ...] = ('ancestral', 'ddim', 'dpm_solver++')
  nfes: tuple[int, ...] = (5, 10, 20)
  probe: str = 'ddim:10'
  title: str = 'AT vs standard training'
  needs_base: bool = False         # --base is required (nothing to train it from)

  def seeds_by_arm(self, seeds: tuple[int, ...], few_seeds: int) -> dict[str, tuple[int, ...]]:
    """Every seed for the main arms, the first `few_seeds` for the others (the base arm,
    one checkpoint, has none)."""
    return {name: seeds if name in self.main_arms else seeds[:few_seeds]
            for name in self.arms if name != arms_lib.BASE.name}


REGIMES = {
    'paper': Regime(arms=arms_lib.PAPER_ARMS, seeds=(0, 1, 2, 3, 4),
                    main_arms=('standard', 'free_1x'), few_seeds=3, updates_ratio=1.0,
                    base_rule=PlateauRule()),
    'cd': Regime(arms=tuple(arms_lib.CM_ARMS), seeds=(0, 1, 2),
                 main_arms=tuple(arms_lib.CM_ARMS), few_seeds=3,
                 updates=600, lr=2e-4, known_arms=arms_lib.CM_ARMS, reference='cd',
                 source_field='teacher', samplers=('consistency',), nfes=(1, 2, 4),
                 probe='consistency:2', title='CD + AT vs CD', needs_base=True),
    'short': Regime(arms=arms_lib.SHORT_ARMS, seeds=(0, 1, 2), main_arms=arms_lib.SHORT_ARMS,
                    few_seeds=3,
                    updates=300),
}
