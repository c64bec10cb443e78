"""BatchNorm in QAT: the folded conv matches an unfused conv -> BN reference, live (batch statistics, running
statistics updated) and frozen (running statistics, the deployed arithmetic), and the freeze schedule is kept."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.silu(self.bn(self.conv(x))))


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = ConvBN()
    with torch.no_grad():  # non-trivial BN parameters and statistics
        ref.bn.weight.uniform_(0.5, 2.0)
        ref.bn.bias.uniform_(-1, 1)
        ref.bn.running_mean.uniform_(-0.5, 0.5)
        ref.bn.running_var.uniform_(0.5, 2.0)
    qm = qatkit.quantize(copy.deepcopy(ref).eval(), "onnxruntime", (torch.rand(1, 3, 8, 8),))
    qatkit.calibrate(qm, [torch.rand(4, 3, 8, 8)], method="max")
    return ref, qm


def fake_quant(model: nn.Module, enabled: bool) -> None:
    for q in qatkit.quantization_state(model).quantizers.values():
        q.enable_fake_quant(enabled)


def test_folding_without_fake_quant_is_the_unfused_model_in_eval_and_live_training():
    ref, qm = pair()
    fake_quant(qm, False)
    x = torch.randn(6, 3, 8, 8)
    assert qatkit.quantization_state(qm).sites["conv"].fold_bn == "bn"
    torch.testing.assert_close(qm.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    ref.train(), qm.train()  # live: batch statistics, running statistics updated alike
    torch.testing.assert_close(qm(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qm.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(qm.bn.running_var, ref.bn.running_var)


def test_frozen_bn_trains_with_running_statistics_and_keeps_them():
    ref, qm = pair()
    fake_quant(qm, False)
    qatkit.freeze(qm, bn=True)
    before = qm.bn.running_mean.clone()
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(qm.train()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(qm.bn.running_mean, before)


@pytest.mark.parametrize("frozen", [False, True])
def test_the_weight_quantizer_sees_the_folded_weight(frozen):
    ref, qm = pair()
    if frozen:
        qatkit.freeze(qm, bn=True)
    state = qatkit.quantization_state(qm)
    wq = state.q(state.sites["conv"].weight)
    std = torch.sqrt(ref.bn.running_var + ref.bn.eps)
    folded = ref.conv.weight * (ref.bn.weight / std).reshape(-1, 1, 1, 1)
    seen = []
    wq.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    qm.train()(torch.randn(2, 3, 8, 8))
    torch.testing.assert_close(seen[0], folded.detach(), rtol=1e-6, atol=1e-6)


def test_freeze_state_is_saved_and_scales_freeze(tmp_path):
    _, qm = pair()
    qatkit.freeze(qm, bn=True, scales=True)
    path = qatkit.save(qm, tmp_path / "q.pt")
    back = qatkit.load(lambda: pair()[0], path)
    state = qatkit.quantization_state(back)
    assert bool(state.bn_frozen)
    assert all(bool(q.scale_frozen) for q in state.quantizers.values() if not q.dynamic)
