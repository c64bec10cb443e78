"""Capture without model edits: functional ops get quantizers, unseen paths and capture failures are reported."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets import ModeShy

import qatkit
from qatkit.errors import QatkitWarning

X = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Functional(nn.Module):
    """Every functional op of issue #3's list, in a forward that fx-style module rewriting would have to edit."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.silu(self.a(x))
        z = self.b(y) * torch.sigmoid(y)
        z = F.interpolate(F.max_pool2d(z + y, 2), scale_factor=2.0, mode="nearest")
        p, q = z.chunk(2, 1)
        r, s = y.split(4, 1)
        return self.out(torch.cat([p, q, r, s], 1))


def test_functional_ops_get_quantizers_without_model_edits(tmp_path):
    model = Functional().eval()
    source_forward = type(model).forward
    qatkit.quantize(model, "onnxruntime", (X,))
    state = qatkit.quantization_state(model)
    ops = {k.split("/")[-1].split("#")[0] for k in state.sites if "/" in k}
    assert {"silu", "mul", "sigmoid", "add", "max_pool2d", "interpolate", "chunk", "split", "cat"} <= ops
    assert type(model).forward is source_forward and "forward" not in vars(model)
    qatkit.calibrate(model, [torch.rand(2, 3, 16, 16)], method="max")
    path = qatkit.export_onnx(model, (X,), tmp_path / "f.onnx")
    assert qatkit.verify(model, path, [torch.rand(2, 3, 16, 16)]).within_one_step >= 0.999


class Branchy(nn.Module):
    """Input-dependent control flow (here on the image size): capture sees one path only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if x.shape[-1] > 8:
            y = y * 2.0
        return self.b(y)


def test_a_path_not_seen_at_capture_warns_once_and_runs_float():
    model = qatkit.quantize(Branchy().eval(), "onnxruntime", (torch.zeros(1, 3, 8, 8),))
    qatkit.calibrate(model, [torch.rand(1, 3, 8, 8)], method="max")
    with pytest.warns(QatkitWarning, match=r"/mul#0' did not run when the model was captured") as caught:
        model(torch.rand(1, 3, 16, 16))
        model(torch.rand(1, 3, 16, 16))
    assert len(caught) == 1


def test_capture_failure_falls_back_to_module_level_and_names_the_module(tmp_path):
    model = ModeShy().eval()
    with pytest.warns(QatkitWarning, match=r"capture stopped in <root> \(ModeShy\), in forward\(\).*not supported"):
        qatkit.quantize(model, "onnxruntime", (X,))
    state = qatkit.quantization_state(model)
    assert set(state.sites) == {"a", "b"}  # conv inputs and weights only
    assert all(s.inputs and s.weight for s in state.sites.values())
    qatkit.calibrate(model, [torch.rand(2, 3, 16, 16)], method="max")
    assert qatkit.uncalibrated(model) == []
    path = qatkit.export_onnx(model, (X,), tmp_path / "m.onnx")
    report = qatkit.verify(model, path, [torch.rand(2, 3, 16, 16)])
    assert report.within_one_step >= 0.999


def test_a_model_that_fails_on_its_inputs_is_an_error_not_a_fallback():
    with pytest.raises(qatkit.QatkitError, match="fails on example_inputs even without qatkit"):
        qatkit.quantize(ModeShy().eval(), "onnxruntime", (torch.rand(1, 5, 16, 16),))
