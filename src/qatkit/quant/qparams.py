"""From a clipping range to (scale, zero point): the one place that defines the integer grid.

Calibrators propose ranges; the quantizer and the MSE search both turn them into qparams here, so the error the
search minimises is the error of the grid the quantizer builds.

Scales are bounded below by the *range* the grid covers, not by a raw scale: ``scale * (qmax - qmin)`` is never
below :data:`MIN_RANGE` (1e-4). This is ONNX Runtime's ``MinimumRealRange`` option, which its QNN configuration
(``get_qnn_qdq_config``) sets to 0.0001 for 8- and 16-bit grids because the Qualcomm backends reject tinier scales
(aimet#4054: a scale of 1.19e-7 refused). A raw-scale floor such as 1e-6 would coarsen every legitimate 16-bit
tensor whose range is below 0.065; a range floor touches only tensors whose whole range is below 1e-4, at any
bit-width (floor scale 3.9e-7 for 8 bits, 1.5e-9 for 16). A range that is exactly degenerate (<= 1e-12: an
all-zero channel, a constant-zero tensor) keeps scale 1.0: every value is the zero point whatever the scale, and a
dead conv channel's bias (its only output) then stays far from the int32 bias limit. ``qatkit inspect`` lists the
quantizers and channels this happened to (:func:`collapsed`).
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_RANGE = 1e-4  # the real range a grid covers, scale * (qmax - qmin), is never below this (ORT/QNN's minimum)
DEGENERATE = 1e-12  # a range at or below this is "zero": scale 1.0


class CalibrationError(ValueError):
    """Calibration cannot proceed (bad input, nothing observed, inconsistent state)."""


def scale_floor(qmin: int, qmax: int) -> float:
    """The smallest scale a grid ``[qmin, qmax]`` gets: ``MIN_RANGE / (qmax - qmin)``.

    Args:
        qmin: lowest integer code of the grid.
        qmax: highest integer code of the grid.

    Example:
        >>> f"{scale_floor(0, 255):.3g}", f"{scale_floor(0, 65535):.3g}"
        ('3.92e-07', '1.53e-09')
    """
    return MIN_RANGE / (qmax - qmin)


def _span(lo: Tensor | float, hi: Tensor | float, qmin: int, qmax: int,
          symmetric: bool, check_finite: bool = True) -> tuple[Tensor, Tensor, Tensor, int]:
    """(lo, hi, span, steps): ``scale = span / steps`` before the floor; lo/hi widened to hold 0 when affine."""
    return _span_of(*_range(lo, hi, qmin, qmax, check_finite), qmin, qmax, symmetric)


def _range(lo: Tensor | float, hi: Tensor | float, qmin: int, qmax: int,
           check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """``lo``/``hi`` as float32 tensors of one shape (checked finite on request)."""
    if qmin >= qmax:
        raise ValueError(f"need qmin < qmax, got [{qmin}, {qmax}]")
    lo_t = torch.as_tensor(lo, dtype=torch.float32)
    hi_t = torch.as_tensor(hi, dtype=torch.float32, device=lo_t.device)
    if lo_t.shape != hi_t.shape:
        lo_t, hi_t = torch.broadcast_tensors(lo_t, hi_t)
    if check_finite:
        require_finite(lo_t, hi_t)
    return lo_t, hi_t


def require_finite(lo: Tensor, hi: Tensor) -> None:
    """Raise :class:`CalibrationError` if a range holds NaN or Inf (a device sync)."""
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise CalibrationError(f"range contains NaN/Inf: lo={lo.tolist()}, hi={hi.tolist()}")


def _span_of(lo_t: Tensor, hi_t: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    if symmetric and qmin < 0:
        return lo_t, hi_t, torch.maximum(lo_t.abs(), hi_t.abs()), qmax
    if symmetric:
        return lo_t, hi_t, hi_t.clamp(min=0.0), qmax - qmin
    lo_t, hi_t = lo_t.clamp(max=0.0), hi_t.clamp(min=0.0)
    return lo_t, hi_t, hi_t - lo_t, qmax - qmin


def qparams_of(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """:func:`range_to_qparams` for float32 ``lo``/``hi`` of one shape already checked finite: plain tensor ops
    with no host sync, so that a compiled kernel can trace it (qatkit.quant.kernels' weight path).

    Args:
        lo, hi: the clipping range, float32 tensors of one shape (per tensor: 0-d; per channel: ``[C]``).
        qmin, qmax, symmetric: the grid, as for :func:`range_to_qparams`.

    Example:
        >>> scale, zp = qparams_of(torch.tensor([-0.5]), torch.tensor([1.0]), 0, 255, False)
        >>> f"{scale.item():.4g}", zp.item()
        ('0.005882', 85)
    """
    lo_t, hi_t, span, steps = _span_of(lo, hi, qmin, qmax, symmetric)
    scale = _safe_scale(span, steps, scale_floor(qmin, qmax))
    if symmetric:
        return scale, torch.full_like(lo_t, 0 if qmin < 0 else qmin, dtype=torch.int32)
    return scale, (qmin - torch.round(lo_t / scale)).clamp(qmin, qmax).to(torch.int32)


def range_to_qparams(lo: Tensor | float, hi: Tensor | float, qmin: int, qmax: int,
                     symmetric: bool, *, check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Map a clipping range onto the integer grid ``[qmin, qmax]``.

    * symmetric, signed grid (qmin < 0): ``scale = max(|lo|,|hi|) / qmax``, zp = 0.
    * symmetric, unsigned grid (qmin >= 0): ``scale = hi / (qmax - qmin)``, zp = qmin.
    * affine: the range is first widened to contain 0 (so 0 is exactly representable),
      ``scale = (hi - lo) / (qmax - qmin)``, ``zp = qmin - round(lo / scale)``.

    A range <= 1e-12 gets scale 1.0; any other scale is at least :func:`scale_floor` (see the module docstring).

    Args:
        lo, hi: the clipping range, scalars (per tensor) or ``[C]`` tensors (per channel).
        qmin, qmax: the integer grid.
        symmetric: symmetric (zero point fixed) or affine grid.
        check_finite: raise :class:`CalibrationError` on a NaN/Inf range (a device sync; the quantizer's
            per-step paths skip it, see :meth:`qatkit.quant.quantizer.FakeQuantizer.set_range`).

    Returns:
        ``(scale float32, zero_point int32)`` broadcast to the shape of lo/hi, on their device.

    Example:
        >>> scale, zp = range_to_qparams(-0.5, 1.0, 0, 255, False)
        >>> f"{scale.item():.4g}", zp.item()
        ('0.005882', 85)
        >>> f"{range_to_qparams(0.0, 1e-7, 0, 255, False)[0].item():.4g}"  # below MIN_RANGE: the floor
        '3.922e-07'
    """
    lo_t, hi_t = _range(lo, hi, qmin, qmax, check_finite)
    return qparams_of(lo_t, hi_t, qmin, qmax, symmetric)


def collapsed(lo: Tensor | float, hi: Tensor | float, qmin: int, qmax: int,
              symmetric: bool) -> tuple[Tensor, Tensor]:
    """Which entries of a range collapsed: ``(zero, floored)`` boolean masks shaped like lo/hi.

    ``zero``: the range is degenerate (dead channel, constant tensor), scale 1.0. ``floored``: the range is
    below :data:`MIN_RANGE` (after the grid's step count), scale :func:`scale_floor`.

    Args:
        lo, hi, qmin, qmax, symmetric: as for :func:`range_to_qparams`.

    Example:
        >>> zero, floored = collapsed(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([0.0, 1e-6, 1.0]), 0, 255, False)
        >>> zero.tolist(), floored.tolist()
        ([True, False, False], [False, True, False])
    """
    _, _, span, steps = _span(lo, hi, qmin, qmax, symmetric)
    zero = span <= DEGENERATE
    return zero, ~zero & (span / steps < scale_floor(qmin, qmax))


def _safe_scale(span: Tensor, steps: int, floor: float) -> Tensor:
    """``span / steps``, but 1.0 for a degenerate span and never below ``floor``."""
    scale = (span / steps).masked_fill_(span <= DEGENERATE, 1.0)  # (a fresh tensor: three ops, not five)
    return scale.clamp_(min=floor).to(torch.float32)
