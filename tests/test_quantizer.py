"""FakeQuantizer / QuantScheme units against hand-computed values (real torch ops, tiny tensors)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import qatkit
from qatkit import FakeQuantizer, QuantScheme

UINT8_AFFINE = QuantScheme(bits=8, signed=False, symmetric=False)
INT8_SYM = QuantScheme(bits=8, signed=True, symmetric=True)


def per_channel_int8(axis: int) -> QuantScheme:
    return QuantScheme(bits=8, signed=True, symmetric=True, per_channel=True, axis=axis)


# ---------------------------------------------------------------- per-tensor affine, hand-set range
def test_uint8_affine_set_range_gives_hand_computed_qparams():
    q = FakeQuantizer(UINT8_AFFINE, "act")
    assert not q.is_calibrated
    q.set_range(torch.tensor(-1.0), torch.tensor(1.55))
    assert q.is_calibrated
    # scale = (1.55 - -1) / (255 - 0) = 0.01 ; zp = 0 - round(-1 / 0.01) = 100
    assert q.scale.shape == torch.Size([])
    assert float(q.scale) == pytest.approx(0.01, rel=1e-6)
    assert int(q.zero_point) == 100


def test_uint8_affine_forward_rounds_and_clips():
    q = FakeQuantizer(UINT8_AFFINE, "act")
    q.set_range(torch.tensor(-1.0), torch.tensor(1.55))
    x = torch.tensor([0.123, 3.0, -2.0, 0.0, -0.456, 1.0, 0.5])
    y = q(x)
    # 0.123 -> code 112 -> 0.12 ; 3.0 -> clipped to code 255 -> 1.55 ; -2.0 -> code 0 -> -1.0 ;
    # 0 is exact (code 100) ; -0.456 -> code 54 -> -0.46 ; 1.0 -> code 200 ; 0.5 -> code 150
    expected = torch.tensor([0.12, 1.55, -1.0, 0.0, -0.46, 1.0, 0.5])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    assert float(y[3]) == 0.0  # zero is representable exactly on an affine grid
    # the codes helper agrees with the forward
    codes = q.codes(x)
    assert codes.tolist() == [112, 255, 0, 100, 54, 200, 150]


def test_affine_range_is_widened_to_contain_zero():
    q = FakeQuantizer(UINT8_AFFINE, "act")
    q.set_range(torch.tensor(0.5), torch.tensor(2.55))  # lo > 0: widened to [0, 2.55]
    assert float(q.scale) == pytest.approx(0.01, rel=1e-6)
    assert int(q.zero_point) == 0
    assert float(q(torch.tensor(0.0))) == 0.0


# ---------------------------------------------------------------- per-channel int8 symmetric, dynamic (weights)
def test_per_channel_dynamic_axis0_scale_is_amax_over_qmax():
    w = torch.tensor([
        [[0.5, -1.27], [0.1, 0.2]],
        [[2.54, 0.0], [-0.3, 1.0]],
        [[-0.0635, 0.01], [0.02, 0.03]],
    ])  # C=3 along axis 0
    q = FakeQuantizer(per_channel_int8(0), "conv/weight", channels=3, dynamic=True)
    assert q.is_calibrated  # dynamic quantizers need no calibration
    y = q(w)
    amax = w.abs().amax(dim=(1, 2))
    torch.testing.assert_close(q.scale, amax / 127, rtol=1e-6, atol=0)
    assert q.zero_point.tolist() == [0, 0, 0]
    # every output value lies on its channel's grid and within the channel's amax
    codes = y / q.scale.reshape(3, 1, 1)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert bool((y.abs() <= amax.reshape(3, 1, 1) + 1e-6).all())
    # the channel extremes are exactly representable
    assert float(y[0, 0, 1]) == pytest.approx(-1.27, abs=1e-6)
    assert float(y[1, 0, 0]) == pytest.approx(2.54, abs=1e-6)


def test_per_channel_dynamic_axis1_scale_per_column():
    w = torch.randn(4, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    q = FakeQuantizer(per_channel_int8(1), "convt/weight", channels=5, dynamic=True)
    y = q(w)
    amax = w.abs().amax(dim=(0, 2, 3))
    assert q.scale.shape == torch.Size([5])
    torch.testing.assert_close(q.scale, amax / 127, rtol=1e-6, atol=0)
    ref = torch.fake_quantize_per_channel_affine(w, amax / 127, torch.zeros(5, dtype=torch.int32), 1, -128, 127)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    # error at most half a step of the channel's scale
    assert bool(((y - w).abs() <= (amax / 127 / 2 + 1e-7).reshape(1, 5, 1, 1)).all())


def test_per_channel_dynamic_tracks_weight_updates():
    q = FakeQuantizer(per_channel_int8(0), "w", channels=2, dynamic=True)
    q(torch.tensor([[1.27, 0.0], [0.127, 0.0]]))
    first = q.scale.clone()
    q(torch.tensor([[2.54, 0.0], [0.127, 0.0]]))
    assert float(q.scale[0]) == pytest.approx(2 * float(first[0]), rel=1e-6)
    assert float(q.scale[1]) == pytest.approx(float(first[1]), rel=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_all_zero_channel_gets_scale_one(axis):
    w = torch.tensor([[0.5, -0.25, 0.1], [0.0, 0.0, 0.0], [1.0, 0.3, -2.0]])
    if axis == 1:
        w = w.t().contiguous()  # zero channel is column 1
    q = FakeQuantizer(per_channel_int8(axis), "w", channels=3, dynamic=True)
    y = q(w)
    assert float(q.scale[1]) == 1.0
    assert bool(torch.isfinite(q.scale).all())
    assert bool(torch.isfinite(y).all())
    zero_channel = y.select(axis, 1)
    assert bool((zero_channel == 0).all())
    # other channels are unaffected by the zero channel
    other = w.select(axis, 0).abs().max() / 127
    assert float(q.scale[0]) == pytest.approx(float(other), rel=1e-6)


def test_per_channel_needs_channel_count():
    with pytest.raises(ValueError, match="channel"):
        FakeQuantizer(per_channel_int8(0), "w")


# ---------------------------------------------------------------- QuantScheme grids
@pytest.mark.parametrize("bits", range(2, 9))
def test_scheme_signed_grid(bits):
    s = QuantScheme(bits=bits, signed=True)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert s.onnx_signed


@pytest.mark.parametrize("bits", range(2, 9))
def test_scheme_signed_narrow_grid(bits):
    s = QuantScheme(bits=bits, signed=True, narrow_range=True)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert s.qmin == -s.qmax  # symmetric around zero


@pytest.mark.parametrize("bits", range(2, 9))
def test_scheme_unsigned_grid(bits):
    s = QuantScheme(bits=bits, signed=False, symmetric=False)
    assert (s.qmin, s.qmax) == (0, 2**bits - 1)
    assert not s.onnx_signed


@pytest.mark.parametrize("bits", range(2, 9))
def test_scheme_unsigned_narrow_grid_stays_in_uint_container(bits):
    s = QuantScheme(bits=bits, signed=False, symmetric=False, narrow_range=True)
    assert s.qmax == 2**bits - 1
    assert 0 <= s.qmin < s.qmax


def test_scheme_describe_names_grid():
    assert "[-64,63]" in QuantScheme(bits=7).describe()
    assert "uint8" in UINT8_AFFINE.describe()


@pytest.mark.parametrize("bits", [0, 1, 17, 32])  # 9..16 are int16/uint16 grids (tests/test_int16.py)
def test_scheme_rejects_bits_out_of_range(bits):
    with pytest.raises(ValidationError, match="bits"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("calibrator", ["mse", "percentile", "entropy"])
def test_scheme_per_channel_rejects_histogram_calibrators(calibrator):
    with pytest.raises(ValidationError, match=calibrator):
        QuantScheme(per_channel=True, calibrator=calibrator)


@pytest.mark.parametrize("calibrator", ["max", "ema"])
def test_scheme_per_channel_accepts_max_and_ema(calibrator):
    assert QuantScheme(per_channel=True, calibrator=calibrator).per_channel


def test_scheme_rejects_unknown_field_and_is_frozen():
    with pytest.raises(ValidationError, match="bitz"):
        QuantScheme(bitz=4)
    s = QuantScheme()
    with pytest.raises(ValidationError):
        s.bits = 4


# ---------------------------------------------------------------- sharing: one quantizer, several tensors
def test_shared_quantizer_observes_both_tensors():
    q = FakeQuantizer(UINT8_AFFINE, "shared")
    q.enable_fake_quant(False)  # observe the float values (what qatkit.calibrate does)
    q.start_observing("max")
    a = torch.tensor([-0.5, 0.2, 1.0])
    b = torch.tensor([-1.0, 0.3, 1.55])
    assert torch.equal(q(a), a)
    assert torch.equal(q(b), b)
    assert q.calibrator.num_batches == 2
    q.stop_observing()
    assert q.calibrator is None and not q.observer_enabled
    # range [-1, 1.55] covering both -> scale 0.01, zp 100 (range of `a` alone would give 1.5/255, zp 85)
    assert float(q.scale) == pytest.approx(0.01, rel=1e-6)
    assert int(q.zero_point) == 100
    q.enable_fake_quant(True)
    torch.testing.assert_close(q(b), b, rtol=0, atol=1e-6)  # b's extremes are on the grid


def test_shared_symmetric_quantizer_takes_largest_magnitude():
    q = FakeQuantizer(INT8_SYM, "shared")
    q.enable_fake_quant(False)
    q.start_observing("max")
    q(torch.tensor([0.1, 0.635]))
    q(torch.tensor([-1.27, 0.2]))
    q.stop_observing()
    assert float(q.scale) == pytest.approx(0.01, rel=1e-6)
    assert int(q.zero_point) == 0


def test_stop_observing_without_data_raises_not_calibrated():
    q = FakeQuantizer(UINT8_AFFINE, "never_seen")
    q.start_observing("max")
    with pytest.raises(qatkit.NotCalibratedError, match="never_seen"):
        q.stop_observing()


# ---------------------------------------------------------------- straight-through gradient
def test_straight_through_gradient_inside_range_and_zero_when_clipped():
    q = FakeQuantizer(UINT8_AFFINE, "act")
    q.set_range(torch.tensor(-1.0), torch.tensor(1.55))
    x = torch.tensor([0.123, 3.0, -2.0, 0.0, 1.5, -0.99], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_straight_through_gradient_per_channel():
    q = FakeQuantizer(per_channel_int8(0), "w", channels=2, dynamic=True)
    w = torch.tensor([[1.27, -0.5], [0.3, -0.127]], requires_grad=True)
    (q(w) * torch.tensor([[2.0, 3.0], [4.0, 5.0]])).sum().backward()
    # dynamic range never clips the weight itself: the gradient passes straight through
    assert w.grad.tolist() == [[2.0, 3.0], [4.0, 5.0]]


# ---------------------------------------------------------------- switches and errors
def test_fake_quant_off_returns_input_unchanged():
    q = FakeQuantizer(UINT8_AFFINE, "act")
    q.set_range(torch.tensor(-1.0), torch.tensor(1.55))
    q.enable_fake_quant(False)
    x = torch.tensor([0.123, 3.0, -2.0, 0.0047])
    assert torch.equal(q(x), x)
    q.enable_fake_quant(True)
    assert not torch.equal(q(x), x)


def test_fake_quant_off_works_without_calibration():
    q = FakeQuantizer(UINT8_AFFINE, "raw")
    q.enable_fake_quant(False)
    x = torch.tensor([0.123, 3.0])
    assert torch.equal(q(x), x)


def test_uncalibrated_forward_raises_naming_quantizer():
    q = FakeQuantizer(UINT8_AFFINE, "backbone.conv1/output")
    with pytest.raises(qatkit.NotCalibratedError, match=r"backbone\.conv1/output") as info:
        q(torch.tensor([0.5]))
    assert "calibrate" in str(info.value)
    assert isinstance(info.value, qatkit.QatkitError)


def test_calibration_state_is_in_state_dict():
    q = FakeQuantizer(UINT8_AFFINE, "act")
    q.set_range(torch.tensor(-1.0), torch.tensor(1.55))
    sd = q.state_dict()
    assert set(sd) >= {"scale", "zero_point", "calibrated", "fake_quant_enabled"}
    fresh = FakeQuantizer(UINT8_AFFINE, "act")
    fresh.load_state_dict(sd)
    assert fresh.is_calibrated
    x = torch.tensor([0.123, 3.0, -0.456])
    assert torch.equal(fresh(x), q(x))


# ---------------------------------------------------------------- scale modes during QAT
def _scheme(mode: str, **kw) -> QuantScheme:
    return QuantScheme(bits=8, signed=False, symmetric=False, scale_mode=mode, **kw)


def test_learned_scale_is_a_parameter_that_gets_gradients():
    q = FakeQuantizer(_scheme("learned"), "lsq")
    assert isinstance(q.scale, torch.nn.Parameter)
    q.set_range(torch.tensor(0.0), torch.tensor(1.0))
    x = torch.linspace(-0.2, 1.5, 200, requires_grad=True)
    q(x).square().sum().backward()
    assert q.scale.grad is not None and float(q.scale.grad.abs()) > 0
    assert x.grad is not None and float(x.grad[x.detach() > 1.2].abs().sum()) == 0  # clipped: no input gradient


def test_learned_scale_trains_towards_a_better_range():
    torch.manual_seed(0)
    q = FakeQuantizer(_scheme("learned"), "lsq")
    q.set_range(torch.tensor(0.0), torch.tensor(0.2))  # far too narrow for data in [0, 1]
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    x = torch.rand(4096)
    with torch.no_grad():
        start = float((q(x) - x).square().mean())
    for _ in range(50):
        opt.zero_grad()
        (q(x) - x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert float((q(x) - x).square().mean()) < 0.5 * start
    assert float(q.scale.detach()) > 0.2 / 255


def test_ema_scale_follows_training_batches_but_not_eval():
    q = FakeQuantizer(_scheme("ema", averaging_constant=0.5), "ema")
    q.set_range(torch.tensor(0.0), torch.tensor(1.0))
    q.eval()
    q(torch.full((8,), 3.0))
    assert float(q.range_hi) == 1.0  # eval: fixed
    q.train()
    q(torch.tensor([0.0, 3.0]))
    assert float(q.range_hi) == pytest.approx(2.0)  # 1 + 0.5 * (3 - 1)
    assert float(q.scale) == pytest.approx(2.0 / 255)


def test_fixed_scale_does_not_move_in_training():
    q = FakeQuantizer(_scheme("fixed"), "fixed")
    q.set_range(torch.tensor(0.0), torch.tensor(1.0))
    q.train()
    q(torch.full((8,), 3.0))
    assert float(q.scale) == pytest.approx(1.0 / 255)


def test_weight_scale_mode_must_be_fixed():
    with pytest.raises(qatkit.RecipeError, match="weight.scale_mode"):
        qatkit.load_recipe({"base": "onnxruntime", "weight": {"scale_mode": "learned"}})


def test_learned_activations_export_and_verify(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 2, 1))
    x = torch.rand(1, 3, 8, 8)
    qatkit.quantize(net, {"base": "onnxruntime", "activation": {"scale_mode": "learned"}}, (x,))
    qatkit.calibrate(net, [torch.rand(2, 3, 8, 8)], method="max")
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        net(torch.rand(2, 3, 8, 8)).square().mean().backward()
        opt.step()
    path = qatkit.export_onnx(net, (x,), tmp_path / "lsq.onnx")
    assert qatkit.verify(net, path, [torch.rand(2, 3, 8, 8)]).within_one_step >= 0.999
