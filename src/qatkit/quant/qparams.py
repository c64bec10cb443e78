"""From a clipping range to (scale, zero point): the one place that defines the integer grid.

Calibrators propose ranges; the quantizer and the MSE search both turn them into qparams here, so the error the
search minimises is the error of the grid the quantizer builds.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TINY = 1e-12  # ranges at or below this get scale 1.0; every scale is clamped >= this


class CalibrationError(ValueError):
    """Calibration cannot proceed (bad input, nothing observed, inconsistent state)."""


def range_to_qparams(lo: Tensor | float, hi: Tensor | float, qmin: int, qmax: int,
                     symmetric: bool) -> tuple[Tensor, Tensor]:
    """Map a clipping range onto the integer grid ``[qmin, qmax]``.

    Returns ``(scale float32, zero_point int32)`` broadcast to the shape of lo/hi
    (``[]`` per tensor, ``[C]`` per channel), on the device of lo/hi.

    * symmetric, signed grid (qmin < 0): ``scale = max(|lo|,|hi|) / qmax``, zp = 0.
    * symmetric, unsigned grid (qmin >= 0): ``scale = hi / (qmax - qmin)``, zp = qmin.
    * affine: the range is first widened to contain 0 (so 0 is exactly representable),
      ``scale = (hi - lo) / (qmax - qmin)``, ``zp = qmin - round(lo / scale)``.

    A range <= 1e-12 (e.g. an all-zero channel) gets scale 1.0 rather than 0/NaN/Inf.
    """
    if qmin >= qmax:
        raise ValueError(f"need qmin < qmax, got [{qmin}, {qmax}]")
    lo_t = torch.as_tensor(lo, dtype=torch.float32)
    hi_t = torch.as_tensor(hi, dtype=torch.float32, device=lo_t.device)
    lo_t, hi_t = torch.broadcast_tensors(lo_t, hi_t)
    if not bool(torch.isfinite(lo_t).all() & torch.isfinite(hi_t).all()):
        raise CalibrationError(f"range contains NaN/Inf: lo={lo_t.tolist()}, hi={hi_t.tolist()}")
    if symmetric:
        if qmin < 0:
            span, steps = torch.maximum(lo_t.abs(), hi_t.abs()), qmax
            zp = torch.zeros_like(lo_t, dtype=torch.int32)
        else:
            span, steps = hi_t.clamp(min=0.0), qmax - qmin
            zp = torch.full_like(lo_t, qmin, dtype=torch.int32)
        scale = _safe_scale(span, steps)
        return scale, zp
    lo_t, hi_t = lo_t.clamp(max=0.0), hi_t.clamp(min=0.0)
    scale = _safe_scale(hi_t - lo_t, qmax - qmin)
    zp = (qmin - torch.round(lo_t / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def _safe_scale(span: Tensor, steps: int) -> Tensor:
    """``span / steps``, but 1.0 for a degenerate span and never below 1e-12."""
    scale = torch.where(span <= _TINY, torch.ones_like(span), span / steps)
    return scale.clamp(min=_TINY).to(torch.float32)
