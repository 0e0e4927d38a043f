"""Imports an OpenAI guided-diffusion / improved-diffusion checkpoint as a run of this project.

  python -m atdiff_jax.tools.import_adm --input=64x64_diffusion.pt \\
      --config=configs/imagenet64_adm.py --workdir=runs/in64_imported \\
      --gd_flags="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 \\
        --dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine \\
        --num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True \\
        --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"

writes RUN as training writes it at step 0 (config.json and an Orbax checkpoint whose params
and EMA trees are the checkpoint's weights), for --mode=sample|eval|probe, load_run and
--config.init_from. --config gives the run's data, training and eval blocks; --gd_flags
(the checkpoint's MODEL_FLAGS and DIFFUSION_FLAGS; missing flags take the --gd_defaults
codebase's defaults) set its model and diffusion blocks, except the fields given as
--config.* on this command line. Without --gd_flags the config's model must describe the
checkpoint, and --attention_order must be given. --input may be a .pt (needs torch:
pip install -e '.[convert]') or an .npz of the same keys.
"""
from __future__ import annotations


from absl import flags
from ml_collections import config_flags

from atdiff_jax import command_line

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The recipe whose data, training and eval blocks the run gets.',
    flag_values=FLAGS, lock_config=True)
_INPUT = flags.DEFINE_string('input', None, 'The checkpoint: a .pt state dict, or an .npz.',
                             flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to write; must be new or empty.',
                               flag_values=FLAGS)
_GD_FLAGS = flags.DEFINE_string(
    'gd_flags', None, 'The checkpoint\'s guided-diffusion model and diffusion flags, as one '
    'string ("--num_channels 192 --num_res_blocks 3 ...").', flag_values=FLAGS)
_GD_DEFAULTS = flags.DEFINE_enum(
    'gd_defaults', 'guided', ['guided', 'improved'],
    'Whose defaults fill flags missing from --gd_flags: guided-diffusion\'s, or '
    'improved-diffusion\'s (rescale_timesteps and rescale_learned_sigmas True).',
    flag_values=FLAGS)
_ATTENTION_ORDER = flags.DEFINE_enum(
    'attention_order', None, ['legacy', 'new'],
    'The checkpoint\'s attention order; required without --gd_flags (new: '
    '--use_new_attention_order True; legacy: guided-diffusion\'s default, improved-diffusion).',
    flag_values=FLAGS)
flags.mark_flags_as_required(['input', 'config', 'workdir'], flag_values=FLAGS)


def main() -> None:
  from atdiff_jax import convert  # pylint: disable=g-import-not-at-top
  # The --config.* fields given here win over the checkpoint's flags.
  keep = {name[len('config.'):] for name in FLAGS if name.startswith('config.')}
  options = (convert.parse_flags(_GD_FLAGS.value, _GD_DEFAULTS.value)
             if _GD_FLAGS.value is not None else None)
  convert.import_run(_INPUT.value, _WORKDIR.value, _CONFIG.value, options=options,
                     attention_order=_ATTENTION_ORDER.value, keep=keep)


def cli(argv: list[str]) -> int:
  """The whole command for `argv` (argv[0] is the program), in this process: for tests."""
  return command_line.run(FLAGS, main, argv, __doc__)


if __name__ == '__main__':
  command_line.main(FLAGS, main, __doc__)
