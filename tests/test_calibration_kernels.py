"""The calibrators' compiled arithmetic (qatkit.quant.calibration_math, compiled by qatkit.quant.kernels) equals the
separate ops bit for bit: histogram binning equals torch.histc on and next to every bin edge (compiled, separate
ops, uncompiled fallback), the MSE search's error terms equal the separate ops' on varied candidate grids, and
neither compiles again for new sizes, ranges or bin counts."""
from __future__ import annotations

import pytest
import torch

from qatkit.quant import histogram, kernels
from qatkit.quant.calibration_math import sq_error_terms
from qatkit.quant.histogram import bin_counts


@pytest.fixture(params=["compiled", "separate ops", "uncompiled fallback"])
def binning(request, monkeypatch):
    """bin_counts' three paths: the compiled kernel (large tensors), the separate ops (small tensors), and the
    compiled kernel's uncompiled fallback (no C++ compiler)."""
    kernels.KERNELS.ensure()
    if request.param == "separate ops":
        monkeypatch.setattr(histogram, "FUSED_MIN_NUMEL", 1 << 40)
    elif request.param == "uncompiled fallback":
        monkeypatch.setattr(kernels, "KERNELS", kernels._Kernels.uncompiled())
    elif not kernels.KERNELS.compiled:
        pytest.fail("the compiled kernels did not compile on this machine (is g++ installed?)")
    return request.param


def _edge_values(lo: float, hi: float, bins: int) -> torch.Tensor:
    """Values on, just above and just below every float32 bin edge, mid-bin, hi itself, and random ones."""
    edges = torch.linspace(lo, hi, bins + 1)
    up, down = torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)
    spread = torch.rand(50000) * (edges[-1] - edges[0]) + edges[0]
    x = torch.cat([edges, (edges[:-1] + edges[1:]) / 2, up, down, spread])
    return x[(x >= edges[0]) & (x <= edges[-1])]


@pytest.mark.parametrize("lo, hi, bins", [(-1.0, 1.0, 2048), (0.0, 3.0, 2048), (-123.456, 0.001, 2048),
                                          (1e-7, 1.0000001e-7, 2048), (0.0, 1e-30, 2048), (-0.3, 7.1, 1000),
                                          (-2.5, 1e-3, 3)])
def test_bin_counts_equal_histc(lo, hi, bins, binning):
    x = _edge_values(lo, hi, bins)
    assert x.numel() > 1 << 15  # large enough for the compiled kernel (histogram.FUSED_MIN_NUMEL)
    assert torch.equal(bin_counts(x, bins, lo, hi), torch.histc(x, bins, lo, hi).double())
    if binning == "compiled":
        assert kernels.KERNELS.compiled  # (a failure would have warned, an error under pytest's filterwarnings)


@pytest.mark.parametrize("hi, bins", [(1.0, 2048), (37.25, 1000), (1e-20, 512)])
def test_bin_counts_of_absolute_values_equal_histc(hi, bins, binning):
    x = _edge_values(0.0, hi, bins)
    x = torch.cat([x, -x])  # |x| is binned in the same pass
    assert torch.equal(bin_counts(x, bins, 0.0, hi, absolute=True), torch.histc(x.abs(), bins, 0.0, hi).double())


def test_bin_counts_compile_once():
    """New sizes, ranges and bin counts are new values for the compiled kernel, not new compiles."""
    for absolute in (False, True):
        bin_counts(torch.rand(40000), 2048, 0.0, 1.0, absolute)
    with torch.compiler.set_stance("fail_on_recompile"):
        for shape, bins, lo, hi in [((50000,), 2048, -2.0, 3.0), ((7, 3, 43, 41), 512, 0.0, 1.5),
                                    ((2, 16, 1 << 15), 7, -1.0, 1.0), ((4, 8, 40, 40), 2048, -3.0, 0.5)]:
            x = torch.rand(shape) * (hi - lo) + lo  # activations of any rank and shape
            for absolute in (False, True):
                top = max(-lo, hi) if absolute else hi
                counts = bin_counts(x, bins, 0.0 if absolute else lo, top, absolute)
                reference = torch.histc(x.abs() if absolute else x, bins, 0.0 if absolute else lo, top)
                assert torch.equal(counts, reference.double())


def _random_grids(g: torch.Generator, edges: torch.Tensor, k: int) -> list[torch.Tensor]:
    """``k`` candidate grids (step, g_lo, g_hi as [k, 1] float64) over ``edges``: random ones, ones ending exactly
    on bin edges, tiny steps, grids far inside or beyond the histogram."""
    span = float(edges[-1] - edges[0])
    g_lo = edges[0] + torch.rand(k, 1, generator=g, dtype=torch.float64) * span * 0.6 - 0.1 * span
    g_hi = g_lo + torch.rand(k, 1, generator=g, dtype=torch.float64) * span * 1.2 + 1e-9
    on_edges = torch.randint(0, edges.numel(), (k // 4, 2), generator=g).sort(dim=1).values
    g_lo[: k // 4, 0], g_hi[: k // 4, 0] = edges[on_edges[:, 0]], edges[on_edges[:, 1]]
    steps = torch.tensor([255.0, 15.0, 65535.0, 1e6], dtype=torch.float64)[torch.randint(0, 4, (k, 1), generator=g)]
    return [((g_hi - g_lo) / steps).clamp(min=1e-12), g_lo, g_hi]


def test_compiled_error_terms_equal_separate_ops():
    """The MSE search's compiled error terms are the separate ops' bit for bit, for any number of candidates and
    bins, without compiling again."""
    kernels.KERNELS.ensure()
    if not kernels.KERNELS.compiled:
        pytest.fail("the compiled kernels did not compile on this machine (is g++ installed?)")
    g = torch.Generator().manual_seed(0)
    cases = [(9, 512, -3.0, 5.0), (256, 512, 0.0, 40.0), (2, 2048, -1e-3, 2e-3), (81, 1000, -700.0, 0.5)]
    for i, (k, bins, lo, hi) in enumerate(cases):
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        counts = torch.randint(0, 1000, (bins,), generator=g).double() * (torch.rand(bins, generator=g) < 0.7)
        args = (edges[:-1], edges[1:], histogram.bin_density(edges, counts), *_random_grids(g, edges, k))
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            compiled = kernels.KERNELS.run("sq_error_terms", *args)
        assert kernels.KERNELS.compiled
        assert torch.equal(compiled.view(torch.int64), sq_error_terms(*args).view(torch.int64))
