"""The backward of a weight's fake-quant with a folded BatchNorm factor, in one pass over the weight.

:func:`qatkit.quant.fake_quant_math.weight_scaled_grad` gives the weight's gradient (the straight-through mask at
the folded weight, times the factor) and the factor's (a sum over each output channel). Inductor compiles it into
two passes with a temporary the size of the weight (the masked gradient, written, then read back for the sum); with
the channel sizes left specialisable it fuses them, but recompiles at 4096 values a channel and sums through a
slower accumulator above that. ``weight_kernel.c`` reads the gradient and the weight once and writes the
weight's gradient once, with the per-channel sum in the same loop (AVX2 where the CPU has it). The weight's
gradient is autograd's bit for bit; the factor's is a sum in another order (last bits), as the compiled one was.

Built and loaded by :mod:`qatkit.quant.native`; without a compiler, or with ``QATKIT_FUSED_FAKE_QUANT=0``,
:func:`fused_weight_grad` returns None and the caller runs the compiled (or plain) arithmetic.

Example:
    >>> w, f = torch.randn(1, 64, 300), torch.rand(64) + 0.5
    >>> inv, zp = torch.full((1, 64, 1), 40.0), torch.zeros(1, 64, 1)
    >>> out = fused_weight_grad(torch.randn(1, 64, 300), w, f, inv, zp, -127, 127, True)
    >>> out is None or out[0].shape == w.shape
    True
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native import SPLIT_MIN_NUMEL, NativeKernel

SOURCE = Path(__file__).with_name("weight_kernel.c")
_LIB = NativeKernel(SOURCE, "qatkit_weight_grad",
                    [ctypes.c_void_p] * 5 + [ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_int64,
                                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p],
                    "QAT runs the compiled weight gradient instead")


def fused_weight_grad(grad: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor, inv: torch.Tensor,
                      zp: torch.Tensor, qmin: int, qmax: int,
                      overflow_to_min: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Gradients of ``fake_quant(weight * factor)`` per output channel for ``weight`` and ``factor``: what
    :func:`qatkit.quant.fake_quant_math.weight_scaled_grad` computes, in one pass; None where the kernel does not
    apply (not float32 CPU tensors, or no compiler, or turned off).

    Args:
        grad: the output's gradient, shaped like ``weight``.
        weight: ``[1, C, K]``, C output channels of K values.
        factor: ``[C]``, the folded BatchNorm's factor.
        inv, zp: the forward's ``1/scale`` and zero point per channel (float32, C values each).
        qmin, qmax: the grid.
        overflow_to_min: codes of 2**63 and more count as qmin (the x86 int64 cast of PyTorch's kernels).

    Example:
        >>> w = torch.randn(1, 8, 20)
        >>> out = fused_weight_grad(torch.ones(1, 8, 20), w, torch.ones(8), torch.full((8,), 10.0), torch.zeros(8),
        ...                         -127, 127, True)
        >>> out is None or torch.equal(out[0], torch.ones(1, 8, 20))
        True
    """
    tensors = (grad, weight, factor, inv, zp)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    fn = _LIB.load()
    if fn is None:
        return None
    grad, weight, factor, inv, zp = (t.contiguous() for t in tensors)
    channels = factor.numel()
    k = weight.numel() // max(channels, 1)
    if not channels or channels * k != weight.numel() or grad.numel() != weight.numel() or \
            inv.numel() != channels or zp.numel() != channels:
        return None
    gw, gf = torch.empty_like(weight), torch.empty(channels, dtype=torch.float32)
    parts = max(1, min(torch.get_num_threads(), weight.numel() // SPLIT_MIN_NUMEL, channels))
    step = -(-channels // parts)
    at = [t.data_ptr() for t in (grad, weight, factor, inv, zp, gw, gf)]

    def run(part: int) -> int:
        c0 = part * step
        n = max(0, min(channels, c0 + step) - c0)
        rows, ones = 4 * c0 * k, 4 * c0
        return fn(at[0] + rows, at[1] + rows, at[2] + ones, at[3] + ones, at[4] + ones, float(qmin), float(qmax),
                  int(overflow_to_min), n, k, at[5] + rows, at[6] + ones)

    if parts == 1:
        run(0)
    else:
        list(_LIB.executor().map(run, range(parts)))
    return gw, gf
