"""Public ADM checkpoints (OpenAI's guided-diffusion and improved-diffusion) as runs here.

  state_dict:  reads .pt state dicts (torch, an optional extra) or .npz files of the same keys
  adm_params:  the key and layout mapping to this project's U-Net params, both ways
  gd_options:  guided-diffusion's model and diffusion flags -> config fields
  adm_run:     writes the imported weights as a step-0 run (`import_run`)

The command line is `python -m atdiff_jax.tools.import_adm`.
"""
from atdiff_jax.convert.adm_params import ATTENTION_ORDERS, export_params, import_params
from atdiff_jax.convert.adm_run import import_run, run_config, write_run
from atdiff_jax.convert.errors import ConversionError
from atdiff_jax.convert.gd_options import complete_options, parse_flags, translate
from atdiff_jax.convert.state_dict import read_state_dict, write_npz

__all__ = [
    'ATTENTION_ORDERS', 'ConversionError', 'complete_options', 'export_params',
    'import_params', 'import_run', 'parse_flags', 'read_state_dict', 'run_config', 'translate',
    'write_npz', 'write_run',
]
