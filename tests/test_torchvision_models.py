"""Unmodified torchvision models through quantize -> calibrate -> export -> verify, both recipes.

resnet18 brings in-place ReLU and residual adds; mobilenet_v3_small brings hardswish, squeeze-excitation
(adaptive pooling and a functional multiply) and a linear classifier.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import qatkit
from qatkit.analysis.inspect import KEPT_FLOAT, lint_onnx


@pytest.mark.parametrize("recipe", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_model_round_trip(name, recipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).eval()
    float_keys = set(model.state_dict())
    x = torch.rand(1, 3, 64, 64, generator=g)
    qatkit.quantize(model, recipe, (x,))
    assert type(model) is getattr(torchvision.models, {"resnet18": "ResNet"}.get(name, "MobileNetV3"))
    assert float_keys <= set(model.state_dict())
    qatkit.calibrate(model, [torch.rand(2, 3, 64, 64, generator=g) for _ in range(2)], method="percentile")
    path = qatkit.export_onnx(model, (x,), tmp_path / f"{name}.onnx")
    report = qatkit.verify(model, path, [torch.rand(2, 3, 64, 64, generator=g)])
    assert report.within_one_step >= 0.999, report
    assert report.tapped_outputs_identical
    # onnxruntime: every conv/linear reads int8; tensorrt: only the classifier (an output layer) stays float
    assert lint_onnx(path) == ({} if recipe == "onnxruntime" else {KEPT_FLOAT: 1})
