"""The importer's error type (shared by the tables, the reader and the API)."""


class ConversionError(ValueError):
  """Weights that do not fit the model; the message names each tensor."""
