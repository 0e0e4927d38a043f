"""The one error type of the converters."""
from atdiff_jax.config import ConfigError


class ConversionError(ConfigError):
  """A checkpoint, or its options, that cannot become a run of this project; one line that
  names the key, file or flag, and what to change. A bad input of the import command, so a
  ConfigError."""
