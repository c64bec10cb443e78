"""Run time of a quantized model: hooks and a torch-function mode apply quantizers at captured call sites.

The user's module keeps its class, ``forward``, attributes and ``state_dict`` keys; qatkit adds one submodule,
``_qatkit`` (a :class:`QuantState`, :mod:`.state`), holding the quantizers and the site plan, plus forward hooks
(:mod:`.hooks`). Leaf modules get their inputs/outputs quantized in hooks; inside a conv/linear the weight (with any
following BatchNorm folded in, :mod:`qatkit.bn_fold`) and bias are quantized (:mod:`.execute`); functional ops are
quantized where the mode sees them (:mod:`.dispatch`).
"""
from __future__ import annotations

from .state import QuantState

__all__ = ["QuantState"]
