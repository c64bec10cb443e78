"""One pass over an observed tensor for the histogram calibrators: bin counts, extremes and a NaN check together.

Calibration used to read every observed tensor twice (``aminmax``, the compiled bin index), write an int32 bin
index and read that three times (``bincount``'s two checks and its count). ``histogram_kernel.c`` does it in one
read: the bin index of each block of values, vectorized (AVX2 where the CPU has it, else SSE2), into a small
buffer, counted into four sub-histograms that stay in the L1 cache, with the block's min, max and NaN flag. The
bin index is histc's float32 arithmetic in histc's order, so the counts equal
:func:`qatkit.quant.histogram.bin_counts` bit for bit (tests/test_histogram_kernel.py).

The C file is built and loaded by :mod:`qatkit.quant.native` (once per machine, with the system's C compiler);
ctypes releases the GIL during the call, so a large tensor is split between torch's threads. Without a compiler,
or with ``QATKIT_FUSED_FAKE_QUANT=0``, :func:`fused_bin_counts` returns None and the histogram uses torch's ops
(the same counts).

Example:
    >>> out = fused_bin_counts(torch.rand(1 << 16), 0.0, 1.0, 2048, False)
    >>> out is None or int(out[0].sum()) == 1 << 16
    True
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native import SPLIT_MIN_NUMEL, NativeKernel

SOURCE = Path(__file__).with_name("histogram_kernel.c")
_LIB = NativeKernel(SOURCE, "qatkit_bin_counts",
                    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_int32,
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
                    "calibration uses torch's ops instead")


def fused_bin_counts(x: torch.Tensor, lo: float, hi: float, bins: int,
                     absolute: bool) -> tuple[torch.Tensor, float, float, bool] | None:
    """Histogram of ``x`` (``|x|`` if ``absolute``) over ``[lo, hi]`` in ``bins`` bins, and ``x``'s min, max and
    whether it holds a NaN, from one read of ``x``; None where the kernel does not apply (not a contiguous float32
    CPU tensor, no compiler, or turned off).

    The counts (int64) equal ``torch.histc``'s for values in ``[lo, hi]``; a value outside lands in an end bin, so
    keep the counts only if min and max lie inside (and there is no NaN).

    Args:
        x: the observed values.
        lo, hi: the histogram range (float32 values), ``lo < hi``.
        bins: number of equal-width bins.
        absolute: count ``|x|``.

    Example:
        >>> counts, lo, hi, nan = fused_bin_counts(torch.tensor([0.0, 0.5, 1.0]), 0.0, 1.0, 2, False)
        >>> counts.tolist(), lo, hi, nan
        ([1, 2], 0.0, 1.0, False)
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or not hi > lo:
        return None
    fn = _LIB.load()
    if fn is None:
        return None
    n = x.numel()
    parts = max(1, min(torch.get_num_threads(), n // SPLIT_MIN_NUMEL))
    counts = torch.zeros(parts, bins, dtype=torch.int64)
    extremes = (ctypes.c_float * (2 * parts))()  # ctypes buffers: reading them back costs no tensor op
    nan = (ctypes.c_int32 * parts)()
    step = -(-n // parts)
    base, counts_at, row = x.data_ptr(), counts.data_ptr(), 8 * bins
    extremes_at, nan_at = ctypes.addressof(extremes), ctypes.addressof(nan)

    def run(part: int) -> int:
        start = part * step
        size = max(0, min(n, start + step) - start)
        return fn(base + 4 * start, size, lo, hi, bins, int(absolute), counts_at + row * part,
                  extremes_at + 8 * part, nan_at + 4 * part)

    status = _LIB.run_parts(run, parts)
    if any(status):
        raise MemoryError("qatkit histogram kernel: could not allocate its sub-histograms")
    total = counts[0] if parts == 1 else counts.sum(0)
    return total, min(extremes[0::2]), max(extremes[1::2]), any(nan)
