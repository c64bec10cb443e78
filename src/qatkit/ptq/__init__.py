"""Post-training algorithms that run after calibration and before QAT (or instead of it): each one module.

* :func:`correct_bias` (:mod:`.bias_correction`): per-channel bias shifts so that each layer's mean output is the
  float model's.
"""
from .bias_correction import BiasCorrectionReport, correct_bias

__all__ = ["BiasCorrectionReport", "correct_bias"]
