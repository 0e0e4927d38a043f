"""The one error type of the converters."""


class ConversionError(ValueError):
  """A checkpoint, or its options, that cannot become a run of this project; one line that
  names the key, file or flag, and what to change."""
