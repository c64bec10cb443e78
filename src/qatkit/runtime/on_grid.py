"""Tensors already on a quantizer's grid: applying that quantizer to them again would change nothing.

A fake-quant output holds values ``(c - zp) * s`` of its quantizer's grid, and value-preserving ops (the plan's
``shape`` and ``cat`` sites: max-pool, nearest upsample, reshape, chunk, concat...) keep them there. The
``all_activations`` placement re-applies a quantizer after such ops (ORT wants a Q/DQ pair on every tensor), so in
eager QAT those re-applications are passes over the data whose output equals their input bit for bit (a code
``c`` maps back to ``c``; values in range pass the gradient unchanged). :class:`OnGrid` remembers which tensors are
on which quantizer's grid (:mod:`qatkit.runtime.tensor_stamp`, so an in-place change is noticed), and the run
time skips the re-application.

Calibration (fake-quant off, observers on) uses the same record for the tensors each quantizer has observed in
this forward. A concat of them, or a view (chunk, split, reshape), holds only values already counted, and is not
observed again: it is there because the placement re-applies the quantizer, not because the network reads those
values twice. Before, the demo's C2f concat quantizers counted the first conv's output three times. A max-pool or
upsample output is a tensor of its own, which the next layer reads (the maxima, each value four times), and is
observed as before.

Example usage::

    grid = OnGrid()
    y = q(x)
    grid.add(y, q)
    grid.holds(y, q)      # True until y is modified in place or freed
"""
from __future__ import annotations

import torch

from .tensor_stamp import Stamp, stamp, unchanged

VALUE_PRESERVING = ("shape", "cat")  # site kinds whose outputs hold only values of their inputs


class OnGrid:
    """Which live tensors hold only values on which quantizer's grid (cleared after each forward)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[Stamp, object]] = {}

    def add(self, t: torch.Tensor, quantizer: object) -> None:
        """``t`` holds only values of ``quantizer``'s grid (a fake-quant output of it, or values moved from one).
        Inference tensors (``torch.inference_mode``) have no version counter: they are not remembered."""
        s = stamp(t)
        if s is not None:
            self._known[id(t)] = (s, quantizer)

    def holds(self, t: torch.Tensor, quantizer: object) -> bool:
        """Whether ``t`` is known to be on ``quantizer``'s grid and unchanged since."""
        entry = self._known.get(id(t))
        return entry is not None and entry[1] is quantizer and unchanged(entry[0], t)

    def clear(self) -> None:
        self._known.clear()

    def __bool__(self) -> bool:
        return bool(self._known)
