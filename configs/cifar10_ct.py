"""Easy consistency tuning (CT from a DPM) on CIFAR-10: --config.init_from=WORKDIR_OF_AN_ADM_RUN.

Without init_from it is CT from scratch with ECT's pairs; `--config.consistency.pairs=
improved_ct` gives improved CT's N(k) curriculum instead.
"""
from configs import cifar10_adm, consistency_recipe


def get_config():
  config = consistency_recipe.easy_consistency_tuning(cifar10_adm.get_config())
  config.model.dropout = 0.2
  config.training.num_steps = 200_000
  config.training.lr = 1e-4
  config.consistency.ect_stage_updates = 25_000
  return config
