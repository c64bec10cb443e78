"""The range search of the ``mse`` calibrator: candidate ranges, scored by their expected fake-quant error.

Every candidate goes through :func:`~qatkit.quant.qparams.range_to_qparams` and is scored by
:func:`~qatkit.quant.histogram.expected_sq_error` on the calibrator's histogram (viewed at :data:`SEARCH_BINS`
bins), so the error minimised is the error of the grid the quantizer will build. Ties go to the first candidate.

Cost: candidates x bins of float64 elementwise maths, about 40 operations each
(:func:`~qatkit.quant.calibration_math.sq_error_terms`), then a sum per candidate. On CPU the elementwise chain
runs as one compiled pass over all candidates (:mod:`qatkit.quant.kernels`; the same IEEE operations, so the same
terms bit for bit): the demo's 170 searches take ~0.11 s of CPU instead of ~0.30 s. Uncompiled
(``QATKIT_FUSED_FAKE_QUANT=0``, no C++ compiler, other devices) it runs as separate ops in blocks of at most
:data:`BLOCK_ELEMS` elements: below torch's parallel grain (32768), every operation runs in the calling thread and
its temporaries stay in cache. Blocks of 2**20 elements made each of the ~40 operations a parallel region and an
8 MB allocation; on the shared 2-core machine the search then took ~116 ms of CPU per quantizer instead of ~3 ms
(docs/calibration.md). Each candidate's error is a row sum of its own terms (on CPU the same whichever rows are
summed with it; other devices sum the same blocks as before), so neither the path nor the block size changes a
result (tests/test_calibrators.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .calibration_math import sq_error_terms
from .histogram import Histogram, bin_density
from .qparams import range_to_qparams

__all__ = ["BLOCK_ELEMS", "COARSE", "REFINE", "SEARCH_BINS", "affine_search", "amax_range", "argmin_error",
           "search_view", "symmetric_search"]

BLOCK_ELEMS = 1 << 15  # candidates x bins per evaluation block (torch's parallel grain: one thread, in cache)
COARSE = 256  # symmetric candidates in the first pass
REFINE = 9  # affine refinement points per axis
SEARCH_BINS = 512  # the search's view of the histogram: 4x less work, a quarter-bin of 2048 is far below an int8 step


def amax_range(amax: Tensor, qmin: int) -> tuple[Tensor, Tensor]:
    """Symmetric range as float32: ``(-amax, amax)`` on signed grids, ``(0, amax)`` on unsigned ones."""
    amax = amax.to(torch.float32)
    return (torch.zeros_like(amax) if qmin >= 0 else -amax), amax


def search_view(hist: Histogram) -> tuple[Tensor, Tensor]:
    """``(edges, counts)`` of ``hist`` merged to :data:`SEARCH_BINS` bins (unmerged if its bins don't divide)."""
    group = max(hist.bins // SEARCH_BINS, 1) if hist.bins % SEARCH_BINS == 0 else 1
    return hist.edges()[::group], hist.counts.view(-1, group).sum(1)


def argmin_error(lo: Tensor, hi: Tensor, edges: Tensor, counts: Tensor, qmin: int, qmax: int,
                 symmetric: bool) -> int:
    """Index of the candidate range ``(lo[k], hi[k])`` with the least expected error (the first of equals): the
    argmin of :func:`~qatkit.quant.histogram.expected_sq_error` over the candidates' grids.

    Args:
        lo, hi: candidate ranges, shape ``[K]``.
        edges, counts: the histogram (``[B + 1]`` edges, ``[B]`` float64 counts).
        qmin, qmax, symmetric: the integer grid, as for :func:`range_to_qparams`.

    Example:
        >>> edges = torch.linspace(-1, 1, 5, dtype=torch.float64)
        >>> counts = torch.tensor([1.0, 500, 500, 1], dtype=torch.float64)  # an outlier on each side: clip them
        >>> argmin_error(torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.5]), edges, counts, -8, 7, True)
        1
    """
    if lo.numel() == 1:
        return 0
    scale, zp = range_to_qparams(lo, hi, qmin, qmax, symmetric)
    s, zp = scale.double()[:, None], zp.double()[:, None]
    g_lo, g_hi = (qmin - zp) * s, (qmax - zp) * s
    return int(torch.argmin(_row_sums(edges, counts, s, g_lo, g_hi) / counts.sum().clamp(min=1.0)))


def _row_sums(edges: Tensor, counts: Tensor, s: Tensor, g_lo: Tensor, g_hi: Tensor) -> Tensor:
    """Each candidate row's sum of :func:`~qatkit.quant.calibration_math.sq_error_terms`: on CPU one compiled pass
    over all rows, else separate ops and a sum per cache-sized block of rows (see the module docstring; the blocks
    are the earlier code's, so other devices sum exactly as before)."""
    a, b, density = edges[:-1], edges[1:], bin_density(edges, counts)
    if edges.device.type == "cpu":
        kernels.KERNELS.ensure()
        if kernels.KERNELS.compiled:  # (detached: no views, so no guards on their bases' shapes)
            return kernels.KERNELS.run("sq_error_terms", *(t.detach() for t in (a, b, density, s, g_lo, g_hi))).sum(1)
    rows = max(BLOCK_ELEMS // counts.numel(), 1)
    return torch.cat([sq_error_terms(a, b, density, s[k:k + rows], g_lo[k:k + rows], g_hi[k:k + rows]).sum(dim=1)
                      for k in range(0, s.shape[0], rows)])


def symmetric_search(edges: Tensor, counts: Tensor, amax: float, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Best ``amax`` among the bin edges below the observed ``amax`` (plus ``amax``), coarse to fine.

    First every ``stride``-th candidate (at most :data:`COARSE`), then every candidate around the best one.
    Returns ``(lo, hi)`` float32 scalars.
    """
    cand = torch.cat([edges[1:][edges[1:] < amax], edges.new_tensor([amax])])
    stride = -(-cand.numel() // COARSE)
    coarse = torch.cat([torch.arange(0, cand.numel() - 1, stride), torch.tensor([cand.numel() - 1])])
    best = int(coarse[argmin_error(*amax_range(cand[coarse.to(cand.device)], qmin), edges, counts, qmin, qmax,
                                   True)])
    lo, hi = amax_range(cand[max(best - stride + 1, 0):best + stride], qmin)
    best = argmin_error(lo, hi, edges, counts, qmin, qmax, True)
    return lo[best], hi[best]


def affine_search(edges: Tensor, counts: Tensor, mn: float, mx: float, qmin: int, qmax: int,
                  grid: int) -> tuple[Tensor, Tensor]:
    """Best ``(lo, hi)`` on a ``grid`` x ``grid`` lattice of fractions of the observed ``mn`` and ``mx``, then on a
    :data:`REFINE` x :data:`REFINE` lattice spanning the best point's neighbours. A side with no data of its sign
    has the single candidate 0. Returns float32 scalars.
    """
    fracs = torch.linspace(1.0 / grid, 1.0, grid, dtype=torch.float64, device=edges.device)
    lo_c = fracs * mn if mn < 0 else fracs.new_zeros(1)
    hi_c = fracs * mx if mx > 0 else fracs.new_zeros(1)
    bi, bj = divmod(argmin_error(*_product(lo_c, hi_c), edges, counts, qmin, qmax, False), hi_c.numel())
    lo, hi = _product(_between(lo_c, bi), _between(hi_c, bj))
    best = argmin_error(lo, hi, edges, counts, qmin, qmax, False)
    return lo[best].to(torch.float32), hi[best].to(torch.float32)


def _product(lo_c: Tensor, hi_c: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = torch.meshgrid(lo_c, hi_c, indexing="ij")
    return lo.reshape(-1), hi.reshape(-1)


def _between(values: Tensor, i: int) -> Tensor:
    """:data:`REFINE` points spanning the neighbours of ``values[i]``; a single value stays single (its span is
    empty: repeating it would score the same candidates :data:`REFINE` times)."""
    if values.numel() == 1:
        return values
    last = values.numel() - 1
    return torch.linspace(float(values[max(i - 1, 0)]), float(values[min(i + 1, last)]), REFINE,
                          dtype=values.dtype, device=values.device)
