"""The command line's own mistakes, caught before absl and ml_collections turn them into
tracebacks: a missing config file, a `--config.<field>` the config does not have, a value
of the wrong type. Each becomes one `config.<field>` / `--flag` line.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Sequence

import ml_collections

from atdiff_jax.config import ConfigError, unknown_field

_OVERRIDE = '--config.'


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


def check_argv(argv: Sequence[str]) -> None:
  """Raises ConfigError for the first config file or override that cannot work."""
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
