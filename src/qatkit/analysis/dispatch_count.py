"""Counting the ATen ops a piece of work dispatches: on a GPU each is a kernel launch, so the count of a QAT step
against a float step measures the per-op cost a GPU user pays, on any machine (``benchmarks/dispatch_cost.py``).

Example usage::

    with OpCounter() as counted:
        model(x).sum().backward()
    sum(counted.ops.values()), counted.ops["aten.convolution"]
"""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it, by overload packet name (``ops["aten.convolution"]``).

    torch.compile's kernels refuse to run under a dispatch mode: count eager work, or with
    ``QATKIT_FUSED_FAKE_QUANT=0`` for qatkit's CPU kernels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
