"""A function of a fake-quantized input as a table lookup: one value per code of the input's grid.

A SiLU that reads a conv output under the ``onnxruntime`` recipe computes, per element, the conv output's
fake-quant, a sigmoid, its fake-quant, the product and the output's fake-quant (the fused kernel of
:mod:`qatkit.quant.kernels`): bound by that arithmetic. Its input is on a grid of at most 256 values, so the whole
chain is a function of the input's code. :func:`lookup` takes the code of each element and reads the chain's value
from a table the caller computed with the same kernel on the grid's values (``lut_kernel.c``: the code's float32
operations as :func:`qatkit.quant.fake_quant_math.fake_quantize_math` computes them, then a gather; AVX2 where the
CPU has it). The result is the kernel's bit for bit (tests/test_lut_kernel.py).

Built and loaded by :mod:`qatkit.quant.native`; without a compiler, or with ``QATKIT_FUSED_FAKE_QUANT=0``,
:func:`lookup` returns None and the caller runs the kernel on every element.

Example:
    >>> codes = torch.arange(0, 16, dtype=torch.float32)
    >>> y = lookup(torch.tensor([0.26, -1.0, 9.0]), 10.0, 0.0, 0.0, 15.0, codes * 2)
    >>> y is None or y.tolist() == [6.0, 0.0, 30.0]
    True
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native import NativeKernel

SOURCE = Path(__file__).with_name("lut_kernel.c")
MAX_CODES = 4096  # a larger grid (16-bit) keeps the per-element kernel: its table would cost more than it saves
_LIB = NativeKernel(SOURCE, "qatkit_lookup",
                    [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_float] * 4 + [ctypes.c_void_p, ctypes.c_void_p],
                    "the quantized SiLU computes every element instead")


def lookup(x: torch.Tensor, inv: float, zp: float, qmin: float, qmax: float,
           table: torch.Tensor) -> torch.Tensor | None:
    """``table[code(x) - qmin]`` for every element of ``x``, where ``code`` is the per-tensor fake-quant's clamped
    code (``nearbyint(x * inv) + zp``, NaN to ``qmin``); None where it does not apply (not contiguous float32 CPU
    tensors, a table of another length, or no compiler).

    Args:
        x: the input (before its fake-quant).
        inv, zp, qmin, qmax: the input quantizer's ``1/scale``, zero point and grid, as float32 values.
        table: ``qmax - qmin + 1`` float32 values, the function at each code's grid value.

    Example:
        >>> y = lookup(torch.tensor([0.4, 7.0, -2.6]), 1.0, 0.0, -1.0, 1.0, torch.tensor([7.0, 8.0, 9.0]))
        >>> y is None or y.tolist() == [8.0, 9.0, 7.0]
        True
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or table.dtype != torch.float32
            or not table.is_contiguous() or table.numel() != int(qmax - qmin) + 1 or table.numel() > MAX_CODES):
        return None
    fn = _LIB.load()
    if fn is None:
        return None
    y = torch.empty_like(x)
    fn(x.data_ptr(), x.numel(), inv, zp, qmin, qmax, table.data_ptr(), y.data_ptr())
    return y
