"""qatkit's exceptions: each names the problem and the fix, so a user never has to read a traceback."""
from __future__ import annotations


class QatkitError(Exception):
    """Base class for every error qatkit raises on purpose."""


class RecipeError(QatkitError, ValueError):
    """A recipe (built-in name, YAML file or dict) is invalid: unknown key, bad value, unknown name."""


class NotCalibratedError(QatkitError, RuntimeError):
    """A quantizer was used (forward with fake-quant on, or export) before it had a scale."""


class CheckpointError(QatkitError, ValueError):
    """A checkpoint does not belong to this model or recipe, or is not a qatkit checkpoint."""


class DataError(QatkitError, ValueError):
    """Calibration / evaluation data is empty or holds non-finite values."""


class QatkitWarning(UserWarning):
    """Something runs float that the recipe would quantize (capture fallback, a path not seen at capture)."""
