"""The one-pass histogram kernel (qatkit.quant.histogram_kernel): the same counts as torch.histc and the torch-op
binning on and next to every bin edge, exact extremes and NaN flag, and histograms (so calibrated ranges) equal to
the previous path over batches that grow the range."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qatkit.quant import histogram_kernel
from qatkit.quant.calibrators import make_calibrator
from qatkit.quant.histogram import Histogram, bin_counts
from qatkit.quant.qparams import CalibrationError
from qatkit.quant.histogram_kernel import fused_bin_counts


@pytest.fixture(autouse=True)
def kernel_available():
    if fused_bin_counts(torch.zeros(4), 0.0, 1.0, 2, False) is None:
        pytest.fail("the histogram kernel did not build on this machine (is a C compiler installed?)")


def edge_values(lo: float, hi: float, bins: int, n_random: int) -> torch.Tensor:
    """Values on, just above and just below every float32 bin edge, mid-bin, and random ones, within [lo, hi]."""
    edges = torch.linspace(lo, hi, bins + 1)
    up, down = torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)
    spread = torch.rand(n_random, generator=torch.Generator().manual_seed(bins)) * (hi - lo) + lo
    x = torch.cat([edges, (edges[:-1] + edges[1:]) / 2, up, down, spread])
    return x[(x >= edges[0]) & (x <= edges[-1])]


@pytest.mark.parametrize("lo, hi, bins", [(-1.0, 1.0, 2048), (0.0, 3.0, 2048), (-123.456, 0.001, 2048),
                                          (1e-7, 1.0000001e-7, 2048), (0.0, 1e-30, 2048), (-0.3, 7.1, 1000),
                                          (-2.5, 1e-3, 3)])
@pytest.mark.parametrize("n_random", [5, 50_001, 2_500_003])  # tails of 4 and 512; split across threads
def test_counts_equal_histc_and_the_torch_op_binning(lo, hi, bins, n_random):
    x = edge_values(lo, hi, bins, n_random)
    counts, mn, mx, nan = fused_bin_counts(x, lo, hi, bins, False)
    assert torch.equal(counts.double(), bin_counts(x, bins, lo, hi))
    assert torch.equal(counts.float(), torch.histc(x, bins, lo, hi))
    assert (mn, mx, nan) == (float(x.min()), float(x.max()), False)


@pytest.mark.parametrize("hi, bins", [(1.0, 2048), (7.5, 1000), (1e-3, 3)])
def test_counts_of_absolute_values(hi, bins):
    x = edge_values(0.0, hi, bins, 100_003)
    x[::2] = -x[::2]  # |x| on the edges, half of them negative
    counts, mn, mx, _ = fused_bin_counts(x, 0.0, hi, bins, True)
    assert torch.equal(counts.double(), bin_counts(x, bins, 0.0, hi, absolute=True))
    assert (mn, mx) == (float(x.min()), float(x.max())), "extremes are of x, not |x|"


def test_nan_and_inf_are_reported():
    x = torch.rand(3_000_001)
    x[2_999_999] = float("inf")
    assert fused_bin_counts(x, 0.0, 1.0, 16, False)[2] == float("inf")
    x[1_234_567] = float("nan")
    assert fused_bin_counts(x, 0.0, 1.0, 16, False)[3] is True
    assert fused_bin_counts(x[:10], 0.0, 1.0, 16, False)[3] is False
    assert fused_bin_counts(x.double(), 0.0, 1.0, 16, False) is None, "float32 only"
    assert fused_bin_counts(x[:3_000_000].view(1000, -1)[:, ::2], 0.0, 1.0, 16, False) is None, "contiguous only"


@pytest.mark.parametrize("absolute", [False, True])
def test_histogram_over_batches_equals_the_previous_path(absolute):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(200_000, generator=g) * s + o for s, o in [(1, 0), (0.5, 0.2), (3, -1), (1, 0), (6, 2)]]
    batches.insert(3, torch.full((1000,), 0.25))  # one value only (inside the range)
    fused, plain = Histogram(2048, absolute), Histogram(2048, absolute)
    for b in batches:
        assert fused.add_fused(b) is not None
        plain.add(b)
        assert torch.equal(fused.counts, plain.counts)
        assert (fused.lo, fused.hi, fused.min, fused.max) == (plain.lo, plain.hi, plain.min, plain.max)


@pytest.mark.parametrize("method", ["mse", "percentile", "entropy"])
def test_a_nan_batch_raises_and_counts_nothing(method):
    c = make_calibrator(method, qmin=0, qmax=255, symmetric=False)
    first = torch.rand(100_000)
    first[5] = float("nan")
    with pytest.raises(CalibrationError, match="1 NaN"):  # the first batch too
        c.observe(first)
    assert c.hist.counts is None and c.num_batches == 0
    c.observe(torch.rand(100_000))
    before = c.hist.counts.clone()
    bad = torch.rand(100_000)
    bad[77] = float("nan")
    with pytest.raises(CalibrationError, match="1 NaN"):
        c.observe(bad)
    assert torch.equal(c.hist.counts, before) and c.num_batches == 1


@pytest.mark.parametrize("env, warns", [({"QATKIT_FUSED_FAKE_QUANT": "0"}, False), ({"CC": "no-such-cc"}, True)])
def test_without_the_kernel_calibration_falls_back(tmp_path, env, warns):
    """Turned off, or no compiler found (a fresh cache folder): None, with a warning naming the fix if it failed."""
    code = ("import warnings, torch\nfrom qatkit.quant.histogram_kernel import fused_bin_counts\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    out = fused_bin_counts(torch.rand(100), 0.0, 1.0, 8, False)\n"
            "print(out is None, any('C compiler' in str(x.message) for x in w))\n")
    path = os.environ.get("PATH", "") if "CC" not in env else ""  # no cc, gcc or clang on PATH either
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QATKIT_CACHE_DIR": str(tmp_path), "PATH": path, **env})
    assert run.stdout.split() == ["True", str(warns)], run.stderr[-2000:]
    assert histogram_kernel.SOURCE.exists()


def test_the_sse2_path_gives_the_same_counts():
    """The kernel picks AVX2 at run time where the CPU has it; QATKIT_HISTOGRAM_SSE2 forces the baseline loop."""
    code = ("import torch\nfrom qatkit.quant.histogram import bin_counts\n"
            "from qatkit.quant.histogram_kernel import fused_bin_counts\n"
            "x = torch.randn(2_000_003, generator=torch.Generator().manual_seed(5))\n"
            "lo, hi = float(x.min()), float(x.max())\n"
            "for absolute in (False, True):\n"
            "    l, h = (0.0, float(x.abs().max())) if absolute else (lo, hi)\n"
            "    c, mn, mx, nan = fused_bin_counts(x, l, h, 2048, absolute)\n"
            "    print(torch.equal(c.double(), bin_counts(x, 2048, l, h, absolute)), mn == lo, mx == hi, nan)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QATKIT_HISTOGRAM_SSE2": "1"})
    assert run.stdout.split() == ["True", "True", "True", "False"] * 2, run.stderr[-2000:]


@pytest.mark.parametrize("absolute", [False, True])
def test_a_first_batch_of_one_value_then_growth(absolute):
    batches = [torch.full((5000,), -0.75), torch.rand(300_000) * 4 - 2, torch.full((10,), 1.5), torch.randn(70_000)]
    fused, plain = Histogram(512, absolute), Histogram(512, absolute)
    used = []
    for b in batches:
        used.append(fused.add_fused(b) is not None)
        if not used[-1]:  # a degenerate range (one value so far): the calibrator then calls add()
            fused.add(b)
        plain.add(b)
        assert torch.equal(fused.counts, plain.counts)
        assert (fused.lo, fused.hi, fused.min, fused.max) == (plain.lo, plain.hi, plain.min, plain.max)
    assert used == [True, absolute, True, True]  # |x| of one value is the range [0, 0.75]: not degenerate
