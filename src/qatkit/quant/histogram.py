"""A bounded-memory histogram that grows its range, and the expected fake-quant error over it.

Shared by the percentile, MSE and entropy calibrators.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..distributed import reduce_minmax, world_size
from . import kernels
from .histogram_kernel import fused_bin_counts
from .calibration_math import bin_index_math, sq_error_terms
from .qparams import CalibrationError

_GROWTH = 0.25  # histogram range grows by at least this fraction, to bound re-binning


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (numpy.interp) in torch; xp increasing, clamps ends."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    t = ((x - x0) / (x1 - x0).clamp(min=torch.finfo(xp.dtype).tiny)).clamp(0.0, 1.0)
    return fp[idx - 1] + t * (fp[idx] - fp[idx - 1])


FUSED_MIN_NUMEL = 1 << 15  # torch's parallel grain: above it the compiled binning beats the eager ops (see below)


def bin_counts(vals: Tensor, bins: int, lo: float, hi: float, absolute: bool = False) -> Tensor:
    """``torch.histc(vals, bins, lo, hi)`` as float64 (of ``|vals|`` if ``absolute``), for float32 ``vals`` within
    ``[lo, hi]``.

    On CPU, histc bins each element in a scalar loop with float32 maths, ``int((v - lo) * bins / (hi - lo))`` with
    lo, hi rounded to float32 and ``v == hi`` in the last bin. :func:`~qatkit.quant.calibration_math.bin_index_math`
    does the same IEEE operations in the same order, then a ``bincount`` counts: every element lands in the same
    bin (tests/test_calibrators.py checks values on and next to every bin edge, compiled and not). Above
    :data:`FUSED_MIN_NUMEL` elements the chain runs as one compiled pass (qatkit.quant.kernels); below, as separate
    ops in the calling thread, where the compiled kernel's ~20 us call costs more (docs/calibration.md). histc
    counts in float32, so the two agree while no bin of one call reaches 2**24 elements (beyond that bincount's
    int64 counts stay exact). Other devices keep histc.

    Args:
        vals: float32 values, all within ``[lo, hi]`` (after ``abs`` if ``absolute``).
        bins: number of equal-width bins over ``[lo, hi]``.
        lo, hi: the histogram range (rounded to float32, as histc does).
        absolute: count ``|vals|``.

    Example:
        >>> bin_counts(torch.tensor([0.0, 0.3, 1.0]), 2, 0.0, 1.0).tolist()
        [2.0, 1.0]
    """
    if vals.device.type != "cpu":
        return torch.histc(vals.abs() if absolute else vals, bins, lo, hi).to(torch.float64)
    # detached: not a view, so the compiled kernel guards on no base tensor's shape (a 4-d base would recompile)
    flat, lo_hi = vals.detach().reshape(-1).detach(), torch.tensor([lo, hi], dtype=torch.float32)
    if flat.numel() > FUSED_MIN_NUMEL and flat.dtype == torch.float32:
        kernels.KERNELS.ensure()
        idx = kernels.KERNELS.run("bin_index", flat, lo_hi, bins, absolute)
    else:
        idx = bin_index_math(flat, lo_hi, bins, absolute)
    return torch.bincount(idx, minlength=bins).to(torch.float64)


def _all_ranks(extremes: Tensor) -> list[float]:
    """``[min, max]`` over all ranks (:func:`qatkit.distributed.reduce_minmax`) as floats: one host sync."""
    if world_size() > 1:
        extremes = torch.stack(reduce_minmax(extremes[0], extremes[1]))
    return extremes.tolist()


class Histogram:
    """Fixed-bin histogram over ``[lo, hi]`` whose range grows when new data exceeds it.

    ``absolute=True`` histograms |x| over ``[0, amax]``; otherwise x over ``[min, max]``.
    On growth the range widens to cover the new data and by at least 25 % (so a slowly
    rising max re-bins only O(log) times), and old counts are re-binned proportionally:
    each old bin's count is assumed uniform within the bin and split by overlap with the
    new bins.  Mass is conserved exactly; positions blur by at most one new bin width per
    re-bin, which is the only approximation (a single-batch histogram has none).
    """

    def __init__(self, bins: int, absolute: bool) -> None:
        self.bins, self.absolute = bins, absolute
        self.counts: Tensor | None = None
        self.lo = self.hi = 0.0  # histogram range
        self.min = self.max = 0.0  # exact observed extremes of x (signed, not |x|)

    def add(self, x: Tensor, extremes: Tensor | None = None) -> None:
        """Count ``x``; ``extremes`` = ``[min, max]`` of this rank's ``x`` when the caller has them already."""
        bmin, bmax = _all_ranks(torch.stack(torch.aminmax(x)) if extremes is None else extremes)
        self._take_range(bmin, bmax, x.device)
        if self.hi <= self.lo:  # degenerate range: every value equals lo
            self.counts[0] += x.numel()
            return
        self.counts += bin_counts(x.float(), self.bins, self.lo, self.hi, self.absolute)

    def add_fused(self, x: Tensor) -> list[float] | None:
        """Count ``x`` (flat) reading it once (:mod:`qatkit.quant.histogram_kernel`; twice for the first batch, whose
        extremes set the range) and return its ``[min, max]`` (float32 values; NaN if ``x`` holds a NaN, and then
        nothing is counted); None where that pass does not apply (several processes, not a float32 CPU tensor,
        counts on another device, no compiler): then use :meth:`add`.

        The counts and the grown range are those :meth:`add` gives: the same bin index over the same range (a batch
        beyond the range is counted again after the range grows)."""
        if (world_size() > 1 or x.device.type != "cpu" or x.dtype != torch.float32
                or (self.counts is not None and self.counts.device != x.device)):
            return None
        if self.counts is None:  # the first batch: its extremes set the range
            extremes = torch.stack(torch.aminmax(x))
            bmin, bmax = extremes.tolist()
            if not (math.isfinite(bmin) and math.isfinite(bmax)):
                return [bmin, bmax]
            lo, hi = self._needed(bmin, bmax)
            if not hi > lo:
                self.add(x, extremes)
                return [bmin, bmax]
        elif self.hi > self.lo:
            lo, hi = self.lo, self.hi
        else:
            return None
        out = fused_bin_counts(x, lo, hi, self.bins, self.absolute)
        if out is None:
            return None
        counts, bmin, bmax, nan = out
        if nan:
            return [math.nan, math.nan]
        if not (math.isfinite(bmin) and math.isfinite(bmax)):
            return [bmin, bmax]
        self._take_range(bmin, bmax, x.device)
        if (self.lo, self.hi) != (lo, hi):  # the range grew: count again over the new one
            counts = fused_bin_counts(x, self.lo, self.hi, self.bins, self.absolute)[0]
        self.counts.add_(counts)  # (int64 counts, exact in float64)
        return [bmin, bmax]

    def _needed(self, bmin: float, bmax: float) -> tuple[float, float]:
        """The range a batch with these extremes needs: ``[0, max |x|]`` for ``absolute``, else ``[min, max]``."""
        return (0.0, max(-bmin, bmax)) if self.absolute else (bmin, bmax)

    def _take_range(self, bmin: float, bmax: float, device: torch.device) -> None:
        """Account for a batch's extremes: the first batch sets the range (and creates the counts), a later one
        widens it if needed (:meth:`_grow`)."""
        need_lo, need_hi = self._needed(bmin, bmax)
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=device)
            self.lo, self.hi, self.min, self.max = need_lo, need_hi, bmin, bmax
        else:
            self.min, self.max = min(self.min, bmin), max(self.max, bmax)
            self._grow(need_lo, need_hi)

    def _grow(self, need_lo: float, need_hi: float) -> None:
        """Widen the range to cover ``[need_lo, need_hi]``, by at least 25 % on a side that grows (re-binning)."""
        if need_lo < self.lo or need_hi > self.hi:
            width = self.hi - self.lo
            new_hi = self.hi if need_hi <= self.hi else max(need_hi, self.hi + _GROWTH * width)
            new_lo = self.lo if need_lo >= self.lo else min(need_lo, self.lo - _GROWTH * width)
            self._rebin(new_lo, new_hi)

    def _require(self) -> Tensor:
        if self.counts is None:
            raise CalibrationError("histogram is empty: nothing observed yet")
        return self.counts

    def _rebin(self, new_lo: float, new_hi: float) -> None:
        counts = self._require()
        new_edges = torch.linspace(new_lo, new_hi, self.bins + 1, dtype=torch.float64,
                                   device=counts.device)
        if self.hi > self.lo:
            cdf = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            self.counts = _interp(new_edges, self.edges(), cdf).diff().clamp(min=0.0)
        else:  # point mass at lo goes to the new bin containing it
            total, self.counts = counts.sum(), torch.zeros_like(counts)
            pos = (self.lo - new_lo) / (new_hi - new_lo) * self.bins
            self.counts[min(int(pos), self.bins - 1)] = total
        self.lo, self.hi = new_lo, new_hi

    def edges(self) -> Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64,
                              device=self._require().device)

    def percentile(self, p: float) -> float:
        """Value below which ``p`` % of the mass lies, interpolating inside the bin."""
        counts = self._require()
        cdf = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        target = min(p / 100.0, 1.0) * float(cdf[-1])
        idx = min(int(torch.searchsorted(cdf, cdf.new_tensor([target]))[0]), self.bins)
        if idx == 0 or self.hi <= self.lo:
            return self.lo
        edges, k = self.edges(), idx - 1
        frac = (target - float(cdf[k])) / max(float(counts[k]), 1e-300)
        value = float(edges[k]) + min(max(frac, 0.0), 1.0) * float(edges[k + 1] - edges[k])
        lo_obs, hi_obs = (0.0, max(-self.min, self.max)) if self.absolute else (self.min, self.max)
        return min(max(value, lo_obs), hi_obs)

    def state(self) -> dict[str, Tensor]:
        counts = self._require()
        dev = counts.device
        return {"hist_counts": counts.clone(),
                "hist_range": torch.tensor([self.lo, self.hi], dtype=torch.float64, device=dev),
                "observed_minmax": torch.tensor([self.min, self.max], dtype=torch.float64, device=dev)}

    def load(self, state: dict[str, Tensor]) -> None:
        counts = state["hist_counts"]
        if counts.shape != (self.bins,):
            raise CalibrationError(f"hist_counts has shape {tuple(counts.shape)}, calibrator uses {self.bins} bins")
        self.counts = counts.detach().to(torch.float64).clone()
        self.lo, self.hi = (float(v) for v in state["hist_range"])
        self.min, self.max = (float(v) for v in state["observed_minmax"])


def expected_sq_error(edges: Tensor, counts: Tensor, scale: Tensor, g_lo: Tensor, g_hi: Tensor) -> Tensor:
    """Mean squared fake-quant error of the histogram for each candidate grid.

    Candidates are rows (``scale``, ``g_lo``, ``g_hi`` of shape [K, 1]: step and the
    lowest / highest representable value).  Each bin's mass is taken as uniform inside the
    bin and the error is integrated exactly: rounding error between g_lo and g_hi,
    clipping error ``(v - g)^2`` outside.  Returns [K].
    """
    terms = sq_error_terms(edges[:-1], edges[1:], bin_density(edges, counts), scale, g_lo, g_hi)
    return terms.sum(dim=1) / counts.sum().clamp(min=1.0)


def bin_density(edges: Tensor, counts: Tensor) -> Tensor:
    """Count per unit length of each bin (0 for an empty bin, also of zero width).

    Args:
        edges: ``[B + 1]`` bin edges, increasing.
        counts: ``[B]`` counts.

    Example:
        >>> bin_density(torch.tensor([0.0, 0.5, 2.0]), torch.tensor([1.0, 3.0])).tolist()
        [2.0, 2.0]
    """
    return counts / (edges[1:] - edges[:-1]).clamp(min=1e-300)
