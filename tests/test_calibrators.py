"""Calibrators against hand-computed cases (real torch, no mocks, small data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qatkit.quant import kernels, mse_search
from qatkit.quant.calibrators import (
    CALIBRATORS,
    CalibrationError,
    Calibrator,
    make_calibrator,
    range_to_qparams,
)
from qatkit.quant.histogram import expected_sq_error

INT8 = {"qmin": -128, "qmax": 127}
UINT8 = {"qmin": 0, "qmax": 255}
METHODS = ["max", "ema", "percentile", "mse", "entropy"]


def fq_mse(x: torch.Tensor, lo, hi, qmin: int, qmax: int, symmetric: bool) -> float:
    """Error of the real grid: fake-quantize with torch's own op using range_to_qparams."""
    scale, zp = range_to_qparams(torch.as_tensor(lo), torch.as_tensor(hi), qmin, qmax, symmetric)
    xq = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    return float(((xq - x) ** 2).mean())


def small_hist(method: str) -> dict:
    """Fewer bins where the bin count is not under test: keeps the file fast on 2 cores."""
    return {} if method in ("max", "ema") else {"bins": 512}


def pair(lo: torch.Tensor, hi: torch.Tensor) -> tuple[list, list]:
    return lo.tolist(), hi.tolist()


# ---------------------------------------------------------------- range_to_qparams
def test_range_to_qparams_hand_cases():
    # int8 symmetric: scale = amax / qmax = 1.27 / 127 = 0.01, zp = 0
    s, z = range_to_qparams(torch.tensor(-1.27), torch.tensor(1.27), -128, 127, True)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.shape == ()
    assert s.item() == pytest.approx(0.01) and z.item() == 0
    # uint8 affine [-1, 1.55]: scale = 2.55 / 255 = 0.01, zp = 0 - round(-1 / 0.01) = 100
    s, z = range_to_qparams(torch.tensor(-1.0), torch.tensor(1.55), 0, 255, False)
    assert s.item() == pytest.approx(0.01) and z.item() == 100
    # uint8 symmetric: scale = hi / qmax = 2.55 / 255, zp = qmin = 0
    s, z = range_to_qparams(torch.tensor(0.0), torch.tensor(2.55), 0, 255, True)
    assert s.item() == pytest.approx(0.01) and z.item() == 0
    # affine range not containing 0 is widened to [0, 2.55] so 0 stays exact: zp = 0
    s, z = range_to_qparams(torch.tensor(0.5), torch.tensor(2.55), 0, 255, False)
    assert s.item() == pytest.approx(0.01) and z.item() == 0


def test_range_to_qparams_per_channel_and_degenerate():
    lo = torch.tensor([0.0, -1.0, -1e-13])
    hi = torch.tensor([0.0, 1.55, 1e-13])
    for sym in (True, False):
        s, z = range_to_qparams(lo, hi, 0, 255, sym)
        assert s.shape == (3,) and z.shape == (3,)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert s[0].item() == 1.0 and s[2].item() == 1.0  # zero / tiny range -> scale 1
    # zero is exactly representable for every channel: fake-quant of 0 is 0
    s, z = range_to_qparams(lo, hi, -128, 127, False)
    zeros = torch.zeros(4, 3)
    assert torch.equal(torch.fake_quantize_per_channel_affine(zeros, s, z, 1, -128, 127), zeros)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        range_to_qparams(torch.tensor(float("nan")), torch.tensor(1.0), -128, 127, True)


# ---------------------------------------------------------------- max / ema
DATA = torch.tensor([[-1.0, 3.0], [2.0, -5.0]])


def test_max_per_tensor():
    # min -5, max 3
    c = make_calibrator("max", **INT8, symmetric=False)
    c.observe(DATA)
    assert pair(*c.compute_range()) == (-5.0, 3.0)
    c = make_calibrator("max", **INT8, symmetric=True)
    c.observe(DATA)
    assert pair(*c.compute_range()) == (-5.0, 5.0)  # amax = max(|-5|, |3|)
    c = make_calibrator("max", **UINT8, symmetric=True)
    c.observe(DATA)
    assert pair(*c.compute_range()) == (0.0, 5.0)  # unsigned grid: lo = 0
    c = make_calibrator("max", **UINT8, symmetric=False)
    c.observe(torch.tensor([1.0, 2.0]))
    assert pair(*c.compute_range()) == (0.0, 2.0)  # affine range always includes 0


@pytest.mark.parametrize(
    "axis, mins, maxs, amax",
    [
        (0, [-1.0, -5.0], [3.0, 2.0], [3.0, 5.0]),  # rows [-1, 3] and [2, -5]
        (1, [-1.0, -5.0], [2.0, 3.0], [2.0, 5.0]),  # cols [-1, 2] and [3, -5]
        (-1, [-1.0, -5.0], [2.0, 3.0], [2.0, 5.0]),  # same as axis 1
    ],
)
def test_max_per_channel(axis, mins, maxs, amax):
    c = make_calibrator("max", **INT8, symmetric=False, axis=axis)
    c.observe(DATA)
    lo, hi = c.compute_range()
    assert lo.shape == (2,) and lo.dtype == torch.float32
    assert pair(lo, hi) == (mins, maxs)
    c = make_calibrator("max", **INT8, symmetric=True, axis=axis)
    c.observe(DATA)
    assert pair(*c.compute_range()) == ([-a for a in amax], amax)


def test_max_accumulates_and_checks_channels():
    c = make_calibrator("max", **INT8, symmetric=False, axis=0)
    c.observe(DATA)
    c.observe(torch.tensor([[-4.0, 0.0], [9.0, 1.0]]))  # row0 min -4, row1 max 9
    assert pair(*c.compute_range()) == ([-4.0, -5.0], [3.0, 9.0])
    assert c.num_batches == 2
    with pytest.raises(CalibrationError, match="channel count"):
        c.observe(torch.zeros(3, 2))


def test_ema_two_batches():
    # batch 1 sets min -1, max 2; batch 2 (min -3, max 4) with c = 0.5:
    # min = -1 + 0.5 * (-3 - -1) = -2 ; max = 2 + 0.5 * (4 - 2) = 3
    c = make_calibrator("ema", **INT8, symmetric=False, averaging_constant=0.5)
    c.observe(torch.tensor([-1.0, 2.0]))
    c.observe(torch.tensor([-3.0, 4.0]))
    assert pair(*c.compute_range()) == (-2.0, 3.0)
    # per channel along axis 1: col0 min -1 -> -1 + 0.5*(-3+1) = -2, col1 max 2 -> 2 + 0.5*(6-2) = 4
    c = make_calibrator("ema", **INT8, symmetric=False, axis=1, averaging_constant=0.5)
    c.observe(torch.tensor([[-1.0, 2.0]]))
    c.observe(torch.tensor([[-3.0, 6.0]]))
    assert pair(*c.compute_range()) == ([-2.0, 0.0], [0.0, 4.0])


# ---------------------------------------------------------------- percentile
def test_percentile_uniform_values():
    x = torch.arange(1000, dtype=torch.float32)  # 0..999, bin width 999/2048 ~ 0.49
    width = 999 / 2048
    c = make_calibrator("percentile", **INT8, symmetric=True, percentile=99.0)
    c.observe(x)
    lo, hi = c.compute_range()
    # 990 of 1000 values are <= 989: the 99th percentile (inverse CDF) is 989, i.e. ~990;
    # the histogram answer lies inside 989's bin (numpy's interpolated value is 989.01)
    assert np.percentile(x.numpy(), 99, method="inverted_cdf") == 989
    assert hi.item() == pytest.approx(989, abs=width) and lo.item() == -hi.item()
    assert abs(hi.item() - 990) <= 2 * width
    # affine on -500..499: hi ~ p99 = 489 (990th value), lo ~ p1 = -491 (10th value)
    c = make_calibrator("percentile", **UINT8, symmetric=False, percentile=99.0)
    c.observe(x - 500)
    lo, hi = c.compute_range()
    assert hi.item() == pytest.approx(489, abs=width)
    assert lo.item() == pytest.approx(-491, abs=width)


def test_histogram_growth_matches_single_batch():
    a, b = torch.linspace(0, 1, 1000), torch.linspace(0, 10, 1000)
    for p in (70.0, 99.0, 99.9):
        grown = make_calibrator("percentile", **INT8, symmetric=True, percentile=p)
        grown.observe(a)
        grown.observe(b)  # range grows from [0, 1] to [0, 10]: counts re-binned
        once = make_calibrator("percentile", **INT8, symmetric=True, percentile=p)
        once.observe(torch.cat([a, b]))
        assert grown.compute_range()[1].item() == pytest.approx(once.compute_range()[1].item(), abs=10 / 2048)
        assert grown.state_dict()["hist_counts"].sum().item() == pytest.approx(2000)  # nothing lost
    # signed histogram growing on both sides, several times
    batches = [torch.linspace(-1, 1, 500), torch.linspace(-10, 5, 500), torch.linspace(-3, 30, 500)]
    grown = make_calibrator("percentile", **INT8, symmetric=False, percentile=98.0)
    for t in batches:
        grown.observe(t)
    once = make_calibrator("percentile", **INT8, symmetric=False, percentile=98.0)
    once.observe(torch.cat(batches))
    width = 40 / 2048 * 2  # final range of `grown` may be up to ~2x wider than the data
    for g, o in zip(grown.compute_range(), once.compute_range()):
        assert g.item() == pytest.approx(o.item(), abs=width)


def test_percentile_rejects_per_channel():
    with pytest.raises(ValueError, match="per-tensor only.*max"):
        make_calibrator("percentile", **INT8, symmetric=True, axis=0)


# ---------------------------------------------------------------- mse
@pytest.mark.parametrize("symmetric, qmin, qmax", [(True, -8, 7), (False, 0, 15), (True, -128, 127)])
def test_mse_ignores_outlier_and_beats_max(symmetric, qmin, qmax):
    torch.manual_seed(0)
    x = torch.randn(10000)
    x[17] = 50.0  # one huge outlier
    c = make_calibrator("mse", qmin=qmin, qmax=qmax, symmetric=symmetric)
    c.observe(x[:5000])
    c.observe(x[5000:])
    lo, hi = c.compute_range()
    err = fq_mse(x, lo, hi, qmin, qmax, symmetric)
    amax = x.abs().max()
    err_max = fq_mse(x, -amax if symmetric else x.min(), amax, qmin, qmax, symmetric)
    assert err <= err_max
    if qmax < 100:
        # 4 bits: the outlier's clip cost (~47^2 / 1e4) beats rounding 1e4 values with step ~7
        assert hi.item() < 15.0
        # and the histogram search is close to a brute-force search on the real data
        if symmetric:
            best = min(fq_mse(x, -a, a, qmin, qmax, True) for a in torch.linspace(0.05, 50, 500).tolist())
            assert err <= best * 1.01
    # (8 bits: 1e4 values are too few for clipping a 50-sigma outlier to pay; MSE keeps ~max)


# ---------------------------------------------------------------- mse search vs brute force
def _score(edges: list, counts: torch.Tensor, lo: float, hi: float, qmin: int, qmax: int, sym: bool) -> float:
    """expected_sq_error of one candidate range (one row), from its real qparams."""
    scale, zp = range_to_qparams(lo, hi, qmin, qmax, sym)
    s, z = float(scale), float(zp)
    s_lo_hi = [torch.tensor([[v]], dtype=torch.float64) for v in (s, (qmin - z) * s, (qmax - z) * s)]
    return float(expected_sq_error(torch.tensor(edges, dtype=torch.float64), counts, *s_lo_hi))


def _first_best(cands: list, edges: list, counts: torch.Tensor, grid: dict, sym: bool) -> int:
    errors = [_score(edges, counts, lo, hi, **grid, sym=sym) for lo, hi in cands]
    return errors.index(min(errors))  # the first of equals, as the search


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def brute_force_mse_range(c: Calibrator) -> tuple[float, float]:
    """MSECalibrator's documented search, one candidate at a time in plain loops (no blocks, no dedup)."""
    h, grid = c.hist, {"qmin": c.qmin, "qmax": c.qmax}
    group = h.bins // 512 if h.bins % 512 == 0 else 1
    edges, counts = h.edges()[::group].tolist(), h.counts.view(-1, group).sum(1)
    if c.symmetric:  # every stride-th edge below amax (plus amax), then every edge around the best
        amax = max(-h.min, h.max)
        cand = [e for e in edges[1:] if e < amax] + [amax]
        stride = -(-len(cand) // 256)
        coarse = list(range(0, len(cand) - 1, stride)) + [len(cand) - 1]

        def ranges(indices) -> list:
            return [(0.0 if c.qmin >= 0 else -_f32(cand[i]), _f32(cand[i])) for i in indices]

        b = coarse[_first_best(ranges(coarse), edges, counts, grid, True)]
        fine = ranges(range(max(b - stride + 1, 0), min(b + stride, len(cand))))
        return fine[_first_best(fine, edges, counts, grid, True)]
    # affine: grid x grid fractions of (min, max), then 9 x 9 points between the best one's neighbours
    fracs = torch.linspace(1.0 / c.options["grid"], 1.0, c.options["grid"], dtype=torch.float64)
    lo_c = (fracs * h.min).tolist() if h.min < 0 else [0.0]
    hi_c = (fracs * h.max).tolist() if h.max > 0 else [0.0]
    bi, bj = divmod(_first_best([(lo, hi) for lo in lo_c for hi in hi_c], edges, counts, grid, False), len(hi_c))

    def around(values: list, i: int) -> list:
        return torch.linspace(values[max(i - 1, 0)], values[min(i + 1, len(values) - 1)], 9,
                              dtype=torch.float64).tolist()

    fine = [(lo, hi) for lo in around(lo_c, bi) for hi in around(hi_c, bj)]
    lo, hi = fine[_first_best(fine, edges, counts, grid, False)]
    return _f32(lo), _f32(hi)


def _laplace_outliers() -> list[torch.Tensor]:
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    x[:4] = torch.tensor([40.0, -25.0, 31.0, -60.0])
    return [x[:10000], 3 * x[10000:]]  # the second batch grows the histogram: counts re-binned


MSE_CASES = {  # name: (batches, grid, symmetric, bins)
    "gaussian-uint8-affine": (lambda: [torch.randn(20000)], UINT8, False, 2048),
    "gaussian-int8-sym": (lambda: [torch.randn(20000)], INT8, True, 2048),
    "laplace-outliers-uint8-affine": (_laplace_outliers, UINT8, False, 2048),
    "laplace-outliers-int4-sym": (_laplace_outliers, {"qmin": -8, "qmax": 7}, True, 512),
    "laplace-outliers-uint4-affine": (_laplace_outliers, {"qmin": 0, "qmax": 15}, False, 512),
    "relu-uint8-affine": (lambda: [torch.relu(torch.randn(20000))], UINT8, False, 2048),
    "relu-uint8-sym": (lambda: [torch.relu(torch.randn(20000))], UINT8, True, 512),
    "constant-uint8-affine": (lambda: [torch.full((500,), 3.0)], UINT8, False, 512),
    "constant-int8-sym": (lambda: [torch.full((500,), -3.0)], INT8, True, 512),
    "laplace-uint16-affine": (_laplace_outliers, {"qmin": 0, "qmax": 65535}, False, 512),
    "relu-uint16-sym": (lambda: [torch.relu(torch.randn(20000))], {"qmin": 0, "qmax": 65535}, True, 512),
}


@pytest.mark.parametrize("case", sorted(MSE_CASES))
def test_mse_search_equals_brute_force(case, monkeypatch):
    make, grid, symmetric, bins = MSE_CASES[case]
    torch.manual_seed(0)
    batches = make()
    c = make_calibrator("mse", **grid, symmetric=symmetric, bins=bins)
    for t in batches:
        c.observe(t)
    lo, hi = c.compute_range()
    if c.hist.hi <= c.hist.lo:  # degenerate (constant affine tensor): the max range, no search
        assert pair(lo, hi) == (0.0, 3.0)
        return
    assert (lo.item(), hi.item()) == brute_force_mse_range(c)
    # rows reduce alone: neither the uncompiled fallback nor its evaluation block changes anything
    monkeypatch.setattr(kernels, "KERNELS", kernels._Kernels.uncompiled())
    for block in (512, 1 << 20):
        monkeypatch.setattr(mse_search, "BLOCK_ELEMS", block)
        assert torch.equal(torch.stack(c.compute_range()), torch.stack([lo, hi]))


# ---------------------------------------------------------------- entropy
def test_entropy_gaussian():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    c = make_calibrator("entropy", **INT8, symmetric=True)
    for chunk in x.chunk(4):
        c.observe(chunk)
    lo, hi = c.compute_range()
    t = hi.item()
    assert 2.0 < t < 5.0 and t < x.abs().max().item() and lo.item() == -t
    # unsigned grid -> (0, t); affine -> each side clipped at t, never past the data
    u = make_calibrator("entropy", **UINT8, symmetric=True)
    u.observe(x.abs())
    assert u.compute_range()[0].item() == 0.0
    a = make_calibrator("entropy", **UINT8, symmetric=False)
    a.observe(x)
    lo, hi = a.compute_range()
    assert max(x.min().item(), -hi.item()) == pytest.approx(lo.item()) and hi.item() < x.max().item()


# ---------------------------------------------------------------- robustness
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric, grid", [(True, INT8), (False, UINT8)])
def test_all_zero_tensor_gives_unit_scale(method, symmetric, grid):
    c = make_calibrator(method, **grid, symmetric=symmetric, **small_hist(method))
    c.observe(torch.zeros(8, 8))
    lo, hi = c.compute_range()
    scale, zp = range_to_qparams(lo, hi, symmetric=symmetric, **grid)
    assert scale.item() == 1.0 and torch.isfinite(lo) and torch.isfinite(hi)
    # then real data arrives: the degenerate histogram grows without losing counts
    c.observe(torch.linspace(-1, 2, 64))
    scale, _ = range_to_qparams(*c.compute_range(), symmetric=symmetric, **grid)
    assert math.isfinite(scale.item()) and 0 < scale.item() < 1


@pytest.mark.parametrize("method", ["max", "ema"])
def test_all_zero_channel(method):
    c = make_calibrator(method, **INT8, symmetric=True, axis=0)
    c.observe(torch.tensor([[0.0, 0.0], [1.27, -0.5]]))
    scale, zp = range_to_qparams(*c.compute_range(), symmetric=True, **INT8)
    assert scale.tolist() == pytest.approx([1.0, 0.01])
    assert not torch.isnan(scale).any() and zp.tolist() == [0, 0]


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_and_empty_state(method):
    c = make_calibrator(method, **INT8, symmetric=True)
    with pytest.raises(CalibrationError, match="before any observe"):
        c.compute_range()
    with pytest.raises(CalibrationError, match="NaN"):
        c.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match="Inf"):
        c.observe(torch.tensor([float("inf"), 0.0]))
    with pytest.raises(CalibrationError, match="floating-point"):
        c.observe(torch.tensor([1, 2]))
    c.observe(torch.empty(0, 4))  # no statistics in it: skipped, not counted
    assert c.num_batches == 0


class EmptySlice(torch.nn.Module):
    """A concat with a zero-width slice (the last stop's test net hit 'cannot calibrate on an empty tensor')."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y[:, :0], y], 1))


@pytest.mark.parametrize("method", ["max", "mse"])
def test_calibration_skips_empty_tensors(method):
    import qatkit

    net = EmptySlice().eval()
    x = torch.rand(2, 3, 8, 8)
    qatkit.quantize(net, "onnxruntime", (x,))
    qatkit.calibrate(net, [torch.rand(2, 3, 8, 8) for _ in range(2)], method=method)
    assert not qatkit.uncalibrated(net)
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()


def test_ema_ranges_skip_empty_tensors_in_training():
    import qatkit

    net = EmptySlice()
    qatkit.quantize(net, "npu-uint8", (torch.rand(2, 3, 8, 8),))  # activation ranges follow a moving average
    qatkit.calibrate(net, [torch.rand(2, 3, 8, 8)], method="max")
    net.train()
    net(torch.rand(2, 3, 8, 8)).square().mean().backward()
    assert all(torch.isfinite(q.scale).all() for q in qatkit.quantization_state(net).quantizers.values())


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="'kmeans'.*entropy.*max.*mse"):
        make_calibrator("kmeans", **INT8, symmetric=True)
    with pytest.raises(ValueError, match="unknown option.*percentil"):
        make_calibrator("percentile", **INT8, symmetric=True, percentil=99.0)
    with pytest.raises(ValueError, match=r"averaging_constant must be a number in \(0, 1\]"):
        make_calibrator("ema", **INT8, symmetric=True, averaging_constant=0.0)
    with pytest.raises(ValueError, match="bins must be an integer"):
        make_calibrator("entropy", **INT8, symmetric=True, bins=100.5)
    assert sorted(CALIBRATORS) == sorted(METHODS)
    assert all(issubclass(cls, Calibrator) and cls.method == name for name, cls in CALIBRATORS.items())


# ---------------------------------------------------------------- state
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_roundtrip(method):
    torch.manual_seed(1)
    per_channel = method in ("max", "ema")
    kwargs = dict(**INT8, symmetric=False, axis=1 if per_channel else None, **small_hist(method))
    c = make_calibrator(method, **kwargs)
    batches = [torch.randn(64, 4) * s for s in (1.0, 3.0, 0.5)]
    for t in batches[:2]:
        c.observe(t)
    state = c.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    d = make_calibrator(method, **kwargs)
    d.load_state_dict(state)
    assert d.num_batches == 2
    for a, b in zip(c.compute_range(), d.compute_range()):
        assert torch.equal(a, b)
    c.observe(batches[2])  # both continue identically, and the loaded state is not aliased
    d.observe(batches[2])
    for a, b in zip(c.compute_range(), d.compute_range()):
        assert torch.equal(a, b)
    c.reset()
    assert c.num_batches == 0
    with pytest.raises(CalibrationError):
        c.compute_range()


def test_load_state_dict_mismatch():
    c = make_calibrator("percentile", **INT8, symmetric=True, bins=64)
    c.observe(torch.randn(100))
    d = make_calibrator("percentile", **INT8, symmetric=True)
    with pytest.raises(CalibrationError, match="64"):
        d.load_state_dict(c.state_dict())
    with pytest.raises(CalibrationError, match="missing"):
        d.load_state_dict({"num_batches": torch.tensor(1)})
    per_channel = make_calibrator("max", **INT8, symmetric=True, axis=0)
    per_channel.observe(DATA)
    with pytest.raises(CalibrationError, match="axis=None"):
        make_calibrator("max", **INT8, symmetric=True).load_state_dict(per_channel.state_dict())
