"""The one command-line layer of every command (main, tools.import_adm, bench, the
experiment): flags, config files and the errors of a bad input, each one line.

A command defines its flags on its own `FlagValues` (so that commands can run one after
another in one process, as the tests do) and hands its body to `run`, which parses the
command line, catches what absl and ml_collections would turn into tracebacks or pages of
usage (a missing config file, a `--config.<field>` the config does not have, a value of the
wrong type, a stray word), runs the body and prints any bad-input error as one line
`error: ...` with exit status 2. Lines about flags end in a pointer to --help.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from typing import Callable, Sequence

import ml_collections
from absl import flags

from atdiff_jax.config import ConfigError, field_paths, unknown_field

_OVERRIDE = '--config.'
_HELP = ('--help', '-h', '-?', '--helpshort', '--helpfull')
HINT = ' (see --help)'


class UsageError(ConfigError):
  """A flag, or a combination of flags, that the command cannot run."""


def _config_argument(argv: Sequence[str]) -> str | None:
  """The value of the last --config=FILE (or --config FILE) in argv."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def load_config_file(argument: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file given as PATH or PATH:ARG, as config_flags reads it."""
  path, _, arg = argument.partition(':')
  spec = importlib.util.spec_from_file_location('_atdiff_config_file', path)
  module = importlib.util.module_from_spec(spec)
  if os.getcwd() not in sys.path:  # config files import their siblings as `configs.*`
    sys.path.insert(0, os.getcwd())
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _reference_config() -> ml_collections.ConfigDict | None:
  """configs/default.py's config, which every recipe edits: the fields that exist. None
  outside this repository's layout."""
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return default.get_config()


def _unknown_file_field(config: ml_collections.ConfigDict) -> str | None:
  """A field the config file adds that no code reads (a typo such as
  `config.training.learning_rate = ...`), as unknown_field's line; None when there is none.
  Sampler options are open-ended here: samplers.options checks them."""
  reference = _reference_config()
  if reference is None:
    return None
  known = set(field_paths(reference))
  for path in field_paths(config):
    if path not in known and not path.startswith('eval.sampler_options.'):
      problem = unknown_field(reference, path)
      if problem:
        return problem
  return None


def check_argv(argv: Sequence[str]) -> None:
  """Raises ConfigError for the first config file, field in it or override that cannot
  work."""
  overrides = [a for a in argv[1:] if a.startswith(_OVERRIDE)]
  argument = _config_argument(argv[1:])
  if argument is None:
    if overrides:
      raise ConfigError(f'{overrides[0]}: overriding a field needs --config=<config file>')
    return
  if not os.path.isfile(argument.partition(':')[0]):
    raise ConfigError(f'--config={argument}: no such file')
  try:
    config = load_config_file(argument)
  except Exception as e:  # the user's file: whatever it raises, say where
    raise ConfigError(f'--config={argument}: cannot be loaded: {type(e).__name__}: {e}') from e
  problem = _unknown_file_field(config)
  if problem:
    raise ConfigError(f'--config={argument} sets {problem}')
  for arg in overrides:
    problem = unknown_field(config, arg[len(_OVERRIDE):].split('=', 1)[0])
    if problem:
      raise ConfigError(problem)


def flag_error_line(error: Exception) -> str:
  """absl's parse error (a value of the wrong type, a missing flag) as one line."""
  message = ' '.join(str(error).split())
  missing = re.search(r'Flag --(\w+) must have a value other than None', message)
  if missing:
    return f'--{missing.group(1)} is required'
  wrong_type = re.match(r"flag --config\.([\w.]+)=(.*?): (?:invalid literal for|could not "
                        r"convert string to) (int|float)", message)
  if wrong_type:
    field, value, kind = wrong_type.groups()
    return f'config.{field}={value}: must be an {kind}' if kind == 'int' else (
        f'config.{field}={value}: must be a {kind}')
  return message[len('flag '):] if message.startswith('flag ') else message


def reset(flag_values: flags.FlagValues) -> None:
  """Forgets an earlier parse: the values and the `--config.*` overrides that config_flags
  defined for it (it defines them anew from the next command line)."""
  for name in list(flag_values):
    if '.' in name:
      delattr(flag_values, name)
    else:  # flag by flag: unparse_flags() would log a line at INFO
      flag_values[name].unparse()


def parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
  """Parses `argv` (argv[0] is the program) into `flag_values`; every mistake in it is one
  ConfigError (UsageError for flags)."""
  check_argv(argv)
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    line = flag_error_line(e)
    raise (ConfigError if line.startswith('config.') else UsageError)(line) from None
  if len(rest) > 1:
    raise UsageError(f'{rest[1]!r}: unexpected argument (flags are written --name=value)')


def _is_input_error(error: Exception, errors: tuple[type, ...]) -> bool:
  """ConfigError, a checkpoint that cannot be used, or one of the command's own `errors`."""
  checkpoint = sys.modules.get('atdiff_jax.checkpoint')  # loaded when one could be raised
  return isinstance(error, (ConfigError,) + errors) or (
      checkpoint is not None and isinstance(error, checkpoint.CheckpointError))


def _error_line(error: Exception) -> str:
  line = ' '.join(str(error).split())
  return f'error: {line}{HINT if isinstance(error, UsageError) else ""}'


def run(flag_values: flags.FlagValues, body: Callable[[], int | None],
        argv: Sequence[str], doc: str = '', errors: tuple[type, ...] = ()) -> int:
  """The command: parses `argv` into `flag_values`, runs `body()` and returns the exit
  status (body's, else 0). A bad input, on the command line or found by `body` (ConfigError,
  CheckpointError or one of `errors`), is one line `error: ...` on stderr and status 2.
  `doc` is what --help prints above the flags."""
  if any(arg in _HELP for arg in argv[1:]):
    print(f'{doc.strip()}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}')
    return 0
  if not flags.FLAGS.is_parsed():  # libraries may read absl's global flags
    flags.FLAGS.mark_as_parsed()
  reset(flag_values)
  saved, sys.argv = sys.argv, list(argv)  # config_flags reads its overrides from sys.argv
  try:
    parse(flag_values, argv)
  except ConfigError as e:
    print(_error_line(e), file=sys.stderr)
    return 2
  finally:
    sys.argv = saved
  try:
    status = body()
  except Exception as e:  # pylint: disable=broad-except
    if not _is_input_error(e, errors):
      raise
    print(_error_line(e), file=sys.stderr)
    return 2
  return 0 if status is None else int(status)


def _quiet_closed_loops(unraisable) -> None:
  """Orbax's async callbacks that outlive their event loop (after a checkpoint failed to
  read) fail when the interpreter exits; printed, they would follow the error line."""
  value = unraisable.exc_value
  if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
    sys.__unraisablehook__(unraisable)


def setup_logging(tag: str = '') -> None:
  """INFO in one format, each line led by `tag` where given (e.g. which run wrote it).
  force: importing Orbax has already set logging up, without INFO."""
  lead = tag.replace('%', '%%') + ' ' if tag else ''
  logging.basicConfig(level=logging.INFO, datefmt='%H:%M:%S', force=True,
                      format='%(asctime)s ' + lead + '%(levelname)s %(message)s')
  for noisy in ('absl', 'jax._src', 'orbax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(flag_values: flags.FlagValues, body: Callable[[], int | None], doc: str = '',
         errors: tuple[type, ...] = ()) -> None:
  """`if __name__ == '__main__'`: `run` on sys.argv, then exit with its status."""
  setup_logging()
  sys.unraisablehook = _quiet_closed_loops
  sys.exit(run(flag_values, body, sys.argv, doc, errors))
