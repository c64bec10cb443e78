"""Range calibrators: collect tensor statistics over batches, propose a clipping range.

A calibrator only proposes ``(lo, hi)``; :func:`range_to_qparams` is the single place
that turns a range into ``(scale, zero_point)``.  The MSE search uses that same
function, so the error it minimises is the error of the grid the quantizer will build.

Histogram-based methods (percentile, mse, entropy) share :class:`~qatkit.quant.histogram.Histogram`, whose
memory is bounded (``bins`` float64 counts) however many batches are observed. The MSE search lives in
:mod:`~qatkit.quant.mse_search`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ..distributed import reduce_minmax, reduce_sum_
from .histogram import Histogram
from .mse_search import BLOCK_ELEMS, affine_search, amax_range, search_view, symmetric_search
from .qparams import CalibrationError, range_to_qparams

__all__ = ["CALIBRATORS", "CalibrationError", "Calibrator", "EMACalibrator", "EntropyCalibrator",
           "MSECalibrator", "MaxCalibrator", "PercentileCalibrator", "make_calibrator", "range_to_qparams"]

_Option = tuple[Any, Callable[[Any], bool], str]  # default, validity check, what valid means

class Calibrator:
    """Base class: input checking, option handling, count of batches, state, range helpers.

    Subclasses set ``method`` and ``OPTIONS`` (name -> (default, check, description)) and
    implement ``_clear``, ``_observe``, ``_compute_range``, ``_state`` and ``_load``.
    """

    method: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, _Option]] = {}
    PER_CHANNEL: ClassVar[bool] = True

    def __init__(self, *, qmin: int, qmax: int, symmetric: bool, axis: int | None = None,
                 **options: Any) -> None:
        if not (isinstance(qmin, int) and isinstance(qmax, int)) or qmin >= qmax:
            raise ValueError(f"need integer qmin < qmax, got qmin={qmin!r}, qmax={qmax!r}")
        if axis is not None and not self.PER_CHANNEL:
            raise ValueError(f"{self.method!r} calibration is per-tensor only (axis must be None); "
                             "use method='max' or 'ema' for per-channel ranges")
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"{self.method!r} calibrator got unknown option(s) {unknown}; "
                             f"valid options: {sorted(self.OPTIONS)}")
        for name, value in options.items():
            default, check, valid = self.OPTIONS[name]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (isinstance(default, int) and not isinstance(value, int)) or not check(value):
                raise ValueError(f"{self.method!r} calibrator option {name} must be {valid}, got {value!r}")
        self.qmin, self.qmax, self.symmetric, self.axis = qmin, qmax, bool(symmetric), axis
        self.options: dict[str, Any] = {name: opt[0] for name, opt in self.OPTIONS.items()} | options
        self._num_batches = 0
        self._clear()

    # -- public API ---------------------------------------------------------------
    def observe(self, x: Tensor) -> None:
        """Accumulate statistics of one batch; rejects NaN/Inf so they never poison ranges. An empty tensor (a
        zero-width slice, no detections) holds no statistics: it is skipped and not counted as a batch."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise CalibrationError(f"expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.numel() == 0:
            return
        x = x.detach()
        lo_hi, extremes = self._observe_fused(x), None  # counted already, if finite
        if lo_hi is None:
            # one reduction instead of isfinite().all(): NaN propagates through aminmax and Inf shows as the
            # extreme; the same extremes then serve the statistics (one pass over x, one host sync)
            extremes = torch.stack(torch.aminmax(x)).to(torch.float32)
            lo_hi = extremes.tolist()
        if not (math.isfinite(lo_hi[0]) and math.isfinite(lo_hi[1])):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise CalibrationError(f"observed tensor contains non-finite values ({n_nan} NaN, "
                                   f"{n_inf} Inf of {x.numel()})")
        if extremes is not None:
            self._observe(x.to(torch.float32), extremes)
        self._num_batches += 1

    def synchronize(self) -> None:
        """Merge what the other ranks observed (once, before ``compute_range``); no-op in one process."""

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """Proposed ``(lo, hi)`` as float32, shape ``[]`` or ``[C]`` (C = channels along axis)."""
        if self._num_batches == 0:
            raise CalibrationError(f"{self.method!r} calibrator: compute_range() called before any observe()")
        lo, hi = self._compute_range()
        return lo.to(torch.float32), hi.to(torch.float32)

    @property
    def num_batches(self) -> int:
        return self._num_batches

    def reset(self) -> None:
        self._num_batches = 0
        self._clear()

    def state_dict(self) -> dict[str, Tensor]:
        state = {"num_batches": torch.tensor(self._num_batches, dtype=torch.int64)}
        if self._num_batches:
            state.update(self._state())
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "num_batches" not in state:
            raise CalibrationError(f"calibrator state is missing 'num_batches' (keys: {sorted(state)})")
        self.reset()
        n = int(state["num_batches"])
        if n:
            try:
                self._load(state)
            except KeyError as err:
                self.reset()
                raise CalibrationError(f"{self.method!r} calibrator state is missing {err}") from None
        self._num_batches = n

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(qmin={self.qmin}, qmax={self.qmax}, symmetric={self.symmetric}, "
                f"axis={self.axis}, options={self.options}, num_batches={self._num_batches})")

    # -- helpers shared by subclasses ----------------------------------------------
    def _range_from_amax(self, amax: Tensor) -> tuple[Tensor, Tensor]:
        """Symmetric range: (-amax, amax) on signed grids, (0, amax) on unsigned ones."""
        return amax_range(amax, self.qmin)

    def _range_from_minmax(self, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
        mn, mx = mn.to(torch.float32), mx.to(torch.float32)
        if self.symmetric:
            return self._range_from_amax(torch.maximum(mn.abs(), mx.abs()))
        return mn.clamp(max=0.0), mx.clamp(min=0.0)

    # -- subclass hooks ----------------------------------------------------------------
    def _clear(self) -> None:
        raise NotImplementedError

    def _observe_fused(self, x: Tensor) -> list[float] | None:
        """Accumulate ``x`` and return its ``[min, max]`` in one pass, counting nothing if they are not finite; None
        where the calibrator has no such pass (then :meth:`_observe` follows the finiteness check)."""
        return None

    def _observe(self, x: Tensor, extremes: Tensor) -> None:
        """Accumulate ``x`` (float32); ``extremes`` = ``[min, max]`` of this rank's ``x`` (not yet reduced)."""
        raise NotImplementedError

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _load(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError


class MaxCalibrator(Calibrator):
    """Running min/max (per channel along ``axis``): never clips, so weights' default."""

    method = "max"

    def _clear(self) -> None:
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None

    def _batch_minmax(self, x: Tensor, extremes: Tensor) -> tuple[Tensor, Tensor]:
        if self.axis is None:
            return extremes[0], extremes[1]
        if x.dim() == 0:
            raise CalibrationError(f"per-channel calibration (axis={self.axis}) needs a tensor with dims, got a scalar")
        if not -x.dim() <= self.axis < x.dim():
            raise CalibrationError(f"axis {self.axis} out of range for tensor of shape {tuple(x.shape)}")
        flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if flat.shape[1] == 0:
            raise CalibrationError(f"tensor of shape {tuple(x.shape)} has no elements per channel")
        if self.min_val is not None and self.min_val.shape[0] != flat.shape[0]:
            raise CalibrationError(f"channel count changed along axis {self.axis}: "
                                   f"{self.min_val.shape[0]} before, {flat.shape[0]} now")
        return torch.aminmax(flat, dim=1)

    def _observe(self, x: Tensor, extremes: Tensor) -> None:
        if self.min_val is not None:
            x, extremes = x.to(self.min_val.device), extremes.to(self.min_val.device)
        bmin, bmax = reduce_minmax(*self._batch_minmax(x, extremes))  # over all ranks (qatkit.distributed)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = bmin.clone(), bmax.clone()
        else:
            self._update(bmin, bmax)

    def _update(self, bmin: Tensor, bmax: Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, bmin)
        self.max_val = torch.maximum(self.max_val, bmax)

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        return self._range_from_minmax(self.min_val, self.max_val)

    def _state(self) -> dict[str, Tensor]:
        return {"min_val": self.min_val.clone(), "max_val": self.max_val.clone()}

    def _load(self, state: dict[str, Tensor]) -> None:
        if (state["min_val"].dim() == 0) != (self.axis is None):
            raise CalibrationError(f"state has min_val of shape {tuple(state['min_val'].shape)}, "
                                   f"calibrator has axis={self.axis}")
        self.min_val = state["min_val"].detach().to(torch.float32).clone()
        self.max_val = state["max_val"].detach().to(torch.float32).clone()


class EMACalibrator(MaxCalibrator):
    """Moving-average min/max (as torch's MovingAverageMinMaxObserver): damps outlier batches."""

    method = "ema"
    OPTIONS = {"averaging_constant": (0.01, lambda c: 0.0 < c <= 1.0, "a number in (0, 1]")}

    def _update(self, bmin: Tensor, bmax: Tensor) -> None:
        c = float(self.options["averaging_constant"])
        self.min_val = self.min_val + c * (bmin - self.min_val)
        self.max_val = self.max_val + c * (bmax - self.max_val)


_BINS_OPTION: _Option = (2048, lambda b: b >= 2, "an integer >= 2")


class _HistogramCalibrator(Calibrator):
    """Shared histogram accumulation for percentile / mse / entropy (per tensor only)."""

    OPTIONS = {"bins": _BINS_OPTION}
    PER_CHANNEL = False

    def _absolute(self) -> bool:
        """Symmetric schemes only need |x|, which halves the range the bins cover."""
        return self.symmetric

    def _clear(self) -> None:
        self.hist = Histogram(self.options["bins"], self._absolute())

    def _observe_fused(self, x: Tensor) -> list[float] | None:
        return self.hist.add_fused(x.reshape(-1))

    def _observe(self, x: Tensor, extremes: Tensor) -> None:
        if self.hist.counts is not None:
            x, extremes = x.to(self.hist.counts.device), extremes.to(self.hist.counts.device)
        self.hist.add(x.reshape(-1), extremes)

    def _state(self) -> dict[str, Tensor]:
        return self.hist.state()

    def synchronize(self) -> None:
        if self.hist.counts is not None:  # ranges already agree (per-batch min/max were reduced): add the counts
            reduce_sum_(self.hist.counts)

    def _load(self, state: dict[str, Tensor]) -> None:
        self.hist.load(state)

    def _scalar(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=torch.float32, device=self.hist.counts.device)

    def _observed_range(self) -> tuple[Tensor, Tensor]:
        """The max-calibrator range; fallback when the histogram is degenerate."""
        return self._range_from_minmax(self._scalar(self.hist.min), self._scalar(self.hist.max))


class PercentileCalibrator(_HistogramCalibrator):
    """Clip at a percentile of |x| (symmetric) or at the two tails of x (affine)."""

    method = "percentile"
    OPTIONS = {"bins": _BINS_OPTION, "percentile": (99.99, lambda p: 50.0 <= p <= 100.0, "a number in [50, 100]")}

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        p = float(self.options["percentile"])
        if self.symmetric:
            return self._range_from_amax(self._scalar(self.hist.percentile(p)))
        lo, hi = self.hist.percentile(100.0 - p), self.hist.percentile(p)
        return self._scalar(min(lo, 0.0)), self._scalar(max(hi, 0.0))


class MSECalibrator(_HistogramCalibrator):
    """Range minimising the expected squared round+clip error on the real integer grid.

    Symmetric: 1-D search over the |x|-histogram bin edges below the observed max (plus
    the max), coarse-to-fine: every ``stride``-th edge (<= 256 candidates), then every
    edge around the best.  Affine: 2-D search over ``grid`` x ``grid`` fractions of the
    observed min and max, then a 9 x 9 grid between the best point's neighbours.
    Candidates go through :func:`range_to_qparams`, so zero-point rounding is included
    (:mod:`~qatkit.quant.mse_search`).
    For symmetric signed grids the |x| histogram assumes negatives clip at -amax (int8
    can reach -128*scale), which slightly over-penalises clipping.
    """

    method = "mse"
    OPTIONS = {"bins": _BINS_OPTION, "grid": (16, lambda g: g >= 2, "an integer >= 2")}

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        h = self.hist
        if h.hi <= h.lo:
            return self._observed_range()
        edges, counts = search_view(h)
        if self.symmetric:
            return symmetric_search(edges, counts, max(-h.min, h.max), self.qmin, self.qmax)
        return affine_search(edges, counts, h.min, h.max, self.qmin, self.qmax, self.options["grid"])


class EntropyCalibrator(_HistogramCalibrator):
    """TensorRT KL-divergence calibration on the |x| histogram.

    For each threshold bin i >= levels: P = hist[:i] with the outlier mass hist[i:]
    folded into its last bin; Q = hist[:i] merged into ``levels`` bins and expanded back
    over P's non-empty bins (as TensorRT / MXNet; Q built without the outliers, so
    clipping is penalised); zero Q bins get a small epsilon; pick the least KL(P||Q).
    ``levels`` is (qmax-qmin+1)//2 when the grid spends half its codes on negatives
    (signed symmetric grid, or an affine range over data with negatives), else qmax-qmin+1;
    with fewer bins than levels (e.g. 16-bit grids) the only candidate is the max.

    Range: symmetric -> (-t, t), or (0, t) on unsigned grids.  Affine -> each side is
    clipped at t but never widened past the data: (max(min, -t), min(max, t)), then
    widened to include 0.
    """

    method = "entropy"
    _EPS = 1e-4

    def _absolute(self) -> bool:
        return True

    def _levels(self) -> int:
        n = self.qmax - self.qmin + 1
        signed = self.qmin < 0 if self.symmetric else self.hist.min < 0
        return max(n // 2, 1) if signed else n

    def _compute_range(self) -> tuple[Tensor, Tensor]:
        h = self.hist
        if h.hi <= h.lo:
            return self._observed_range()
        i_best = self._best_threshold_bin(h.counts, self._levels())
        t = min(i_best * (h.hi - h.lo) / h.bins, max(-h.min, h.max))
        if self.symmetric:
            return self._range_from_amax(self._scalar(t))
        return self._scalar(min(max(h.min, -t), 0.0)), self._scalar(max(min(h.max, t), 0.0))

    @classmethod
    def _best_threshold_bin(cls, counts: Tensor, levels: int) -> int:
        """Exhaustive over thresholds, vectorised: rows are candidates, loop only over chunks."""
        n = counts.numel()
        cand = torch.arange(min(levels, n), n + 1, device=counts.device)
        tail = torch.cat([counts.flip(0).cumsum(0).flip(0), counts.new_zeros(1)])  # tail[i] = sum(counts[i:])
        best_kl, best_i = math.inf, n
        for chunk in cand.split(max(BLOCK_ELEMS // n, 1)):  # one thread, in cache: see mse_search.BLOCK_ELEMS
            cols = int(chunk[-1])  # columns >= the largest threshold of the chunk are all zero
            i, j = chunk[:, None], torch.arange(cols, device=counts.device)
            rows = torch.arange(chunk.numel(), device=counts.device)
            h = counts[:cols] * (j < i)
            p = h.clone()
            p[rows, chunk - 1] += tail[chunk]
            nz = p > 0
            lvl = torch.div(j * levels, i, rounding_mode="floor").clamp_(max=levels - 1)
            sums = counts.new_zeros(chunk.numel(), levels).scatter_add_(1, lvl, h)
            cnt = counts.new_zeros(chunk.numel(), levels).scatter_add_(1, lvl, nz.to(counts.dtype))
            q = torch.gather(sums / cnt.clamp_(min=1.0), 1, lvl).mul_(nz)
            q_mass = q.sum(1, keepdim=True)
            p /= p.sum(1, keepdim=True)
            q = torch.where(nz & (q <= 0), cls._EPS * q_mass, q)  # smoothing keeps KL finite
            q /= q.sum(1, keepdim=True).clamp_(min=1e-300)
            kl = (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(1)
            kl = torch.where(q_mass[:, 0] > 0, kl, math.inf)  # nothing below threshold: invalid Q
            k, idx = torch.min(kl, dim=0)
            if float(k) < best_kl:
                best_kl, best_i = float(k), int(chunk[idx])
        return best_i


CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.method: cls
    for cls in (MaxCalibrator, EMACalibrator, PercentileCalibrator, MSECalibrator, EntropyCalibrator)
}


def make_calibrator(method: str, *, qmin: int, qmax: int, symmetric: bool, axis: int | None = None,
                    **options: Any) -> Calibrator:
    """Build a calibrator by name; unknown names/options raise ValueError listing the valid ones."""
    cls = CALIBRATORS.get(str(method).lower())
    if cls is None:
        raise ValueError(f"unknown calibration method {method!r}; valid methods: {sorted(CALIBRATORS)}")
    return cls(qmin=qmin, qmax=qmax, symmetric=symmetric, axis=axis, **options)
