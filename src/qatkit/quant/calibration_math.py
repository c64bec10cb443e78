"""The calibrators' elementwise arithmetic, as plain torch ops: what :mod:`qatkit.quant.kernels` compiles.

Two hot spots of calibration are one long chain of elementwise operations each: the histogram bin of every
observed value (:func:`bin_index_math`, for :func:`qatkit.quant.histogram.bin_counts`) and the MSE search's error
terms, one per candidate range and histogram bin (:func:`sq_error_terms`, for :mod:`qatkit.quant.mse_search`).
Run as separate ops, each operation is a pass over a temporary; :class:`qatkit.quant.kernels._Kernels` compiles
each chain once into one pass. Inductor evaluates the same IEEE operations in the same order (its C++ is built
without unsafe-math flags and with ``-ffp-contract=off``: a division stays a division, no fused multiply-add), so
the compiled results equal these functions' bit for bit (tests/test_calibrators.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bin_index_math", "sawtooth_integral", "sq_error_terms"]


def bin_index_math(x: Tensor, lo_hi: Tensor, bins: int, absolute: bool) -> Tensor:
    """The ``torch.histc`` bin of each element of ``x`` (``|x|`` if ``absolute``) as int32, for values in [lo, hi].

    histc's CPU arithmetic, one float32 operation at a time in the same order: ``(v - lo) * bins / (hi - lo)``
    truncated, then ``bins - 1`` for ``v == hi``. ``lo_hi`` holds lo and hi as float32, so that new ranges are new
    values for the compiled kernel, not new constants (no recompile).

    Args:
        x: float32 values.
        lo_hi: ``[lo, hi]``, float32.
        bins: number of equal-width bins over ``[lo, hi]``.
        absolute: bin ``|x|``.

    Example:
        >>> bin_index_math(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 1.0]), 4, False).tolist()
        [0, 2, 3]
    """
    v = x.abs() if absolute else x
    lo, width = lo_hi[0], lo_hi[1] - lo_hi[0]
    return v.sub(lo).mul(float(bins)).div(width).to(torch.int32).clamp(max=bins - 1)


def sawtooth_integral(v: Tensor, s: Tensor) -> Tensor:
    """Antiderivative in ``v`` of the rounding error squared, ``(v - s*round(v/s))^2``.

    Args:
        v: points, float64.
        s: grid step, broadcastable against ``v``.

    Example:
        >>> v, step = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        >>> f"{float(sawtooth_integral(v, step).diff()):.6f}"  # the mean of (v - round(v))^2 over [0, 1]: 1/12
        '0.083333'
    """
    u = v / s + 0.5
    n = torch.floor(u)
    r = u - n
    return s ** 3 * (n / 12.0 + ((r - 0.5) ** 3 + 0.125) / 3.0)


def sq_error_terms(a: Tensor, b: Tensor, density: Tensor, scale: Tensor, g_lo: Tensor, g_hi: Tensor) -> Tensor:
    """Each histogram bin's squared fake-quant error under each candidate grid, ``[K, B]``: summed over bins (and
    divided by the total count) it is :func:`qatkit.quant.histogram.expected_sq_error`.

    A bin's mass is uniform over ``[a, b]`` with ``density`` per unit; its error is integrated exactly: rounding
    error between ``g_lo`` and ``g_hi``, clipping error ``(v - g)^2`` outside.

    Args:
        a, b: the bins' lower and upper edges, ``[B]`` float64.
        density: count per unit length in each bin, ``[B]`` float64.
        scale, g_lo, g_hi: each candidate grid's step and its lowest / highest representable value, ``[K, 1]``.

    Example:
        >>> edges = torch.linspace(0, 1, 5, dtype=torch.float64)
        >>> grid = [torch.tensor([[v]], dtype=torch.float64) for v in (0.25, 0.0, 0.5)]  # step, g_lo, g_hi
        >>> sq_error_terms(edges[:-1], edges[1:], torch.full((4,), 4.0, dtype=torch.float64), *grid).shape
        torch.Size([1, 4])
    """
    la, lb = torch.minimum(a, g_lo), torch.minimum(b, g_lo)
    ha, hb = torch.maximum(a, g_hi), torch.maximum(b, g_hi)
    ma, mb = torch.maximum(torch.minimum(a, g_hi), g_lo), torch.maximum(torch.minimum(b, g_hi), g_lo)
    integral = (((lb - g_lo) ** 3 - (la - g_lo) ** 3) + ((hb - g_hi) ** 3 - (ha - g_hi) ** 3)) / 3.0
    integral = integral + sawtooth_integral(mb, scale) - sawtooth_integral(ma, scale)
    return integral * density
