"""The sigmoid inside a SiLU (``x * q(sigmoid(x))`` under ``all_activations``) with its own range fixed at [0, 1]
(recipe ``silu_sigmoid_range: unit``, the ``onnxruntime`` default): set at quantize time, left alone by calibration
and training, kept by checkpoints; ``calibrate`` keeps the old behaviour."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.SiLU()
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(F.silu(self.c1(x)) + self.act(self.c1(x)))


def _quantized(recipe="onnxruntime") -> nn.Module:
    torch.manual_seed(0)
    return qatkit.quantize(Net().eval(), recipe, (torch.rand(1, 3, 16, 16),))


def _sigmoids(qm: nn.Module) -> list:
    state = qatkit.quantization_state(qm)
    return [state.q(s.sigmoid) for s in state.sites.values() if s.sigmoid is not None]


def test_the_sigmoid_quantizers_hold_zero_to_one_from_quantize_on():
    qm = _quantized()
    sigmoids = _sigmoids(qm)
    assert len(sigmoids) == 2
    for q in sigmoids:
        assert q.fixed_range and q.is_calibrated and bool(q.scale_frozen)
        assert float(q.scale) == pytest.approx(1 / 255) and int(q.zero_point) == 0
    qatkit.calibrate(qm, [torch.rand(4, 3, 16, 16) * 4], method="max")
    assert all(float(q.range_lo) == 0.0 and float(q.range_hi) == 1.0 for q in sigmoids)
    assert qatkit.uncalibrated(qm) == []


def test_calibration_sees_the_float_models_silu_outputs():
    """With the sigmoid's quantizer doing nothing, calibration computes ``F.silu`` itself: the module SiLU's output
    quantizer observes the float model's values bit for bit (``x * sigmoid(x)`` differs in the last bits)."""
    qm = _quantized()
    x = torch.rand(4, 3, 16, 16) * 4 - 2
    state = qatkit.quantization_state(qm)
    seen = []
    hook = state.q(state.sites["act"].output).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    qatkit.calibrate(qm, [x], method="max")
    hook.remove()
    with torch.no_grad():
        conv = qm.c1(x)  # (a quantized model's layer called alone runs float)
    assert len(seen) == 1 and torch.equal(seen[0], F.silu(conv))
    assert not torch.equal(conv * torch.sigmoid(conv), F.silu(conv))  # (else this test would show nothing)


@pytest.mark.parametrize("scale_mode", ["ema", "learned"])
def test_training_keeps_the_fixed_range(scale_mode):
    recipe = {"base": "onnxruntime", "activation": {"bits": 8, "signed": False, "symmetric": False,
                                                    "calibrator": "max", "scale_mode": scale_mode}}
    qm = _quantized(recipe)
    qatkit.calibrate(qm, [torch.rand(4, 3, 16, 16)], method="max")
    others = [q for q in qatkit.quantization_state(qm).quantizers.values() if not (q.dynamic or q.fixed_range)]
    before = [q.scale.detach().clone() for q in others]
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        qm(torch.rand(4, 3, 16, 16) * 3).square().mean().backward()
        opt.step()
    assert all(float(q.scale) == pytest.approx(1 / 255) for q in _sigmoids(qm))
    assert any(not torch.equal(q.scale, b) for q, b in zip(others, before))  # the other scales did move


def test_a_checkpoint_keeps_the_fixed_range(tmp_path):
    qm = _quantized()
    qatkit.calibrate(qm, [torch.rand(4, 3, 16, 16)])
    qatkit.save(qm, tmp_path / "q.pt")
    loaded = qatkit.load(Net, tmp_path / "q.pt", (torch.rand(1, 3, 16, 16),))
    assert all(q.fixed_range and float(q.scale) == pytest.approx(1 / 255) for q in _sigmoids(loaded))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(qm(x), loaded.eval()(x))


def test_calibrate_keeps_calibrating_them():
    qm = _quantized({"base": "onnxruntime", "silu_sigmoid_range": "calibrate"})
    sigmoids = _sigmoids(qm)
    assert not any(q.fixed_range or q.is_calibrated for q in sigmoids)
    qatkit.calibrate(qm, [torch.rand(4, 3, 16, 16) * 4 - 2], method="max")
    assert all(0.0 == float(q.range_lo) and 0.5 < float(q.range_hi) < 1.0 for q in sigmoids)


def test_an_unknown_value_names_the_valid_ones():
    with pytest.raises(qatkit.RecipeError, match="calibrate") as info:
        qatkit.load_recipe({"base": "onnxruntime", "silu_sigmoid_range": "fixed"})
    assert "unit" in str(info.value)
