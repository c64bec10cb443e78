"""torch.compile of a quantized model runs and gives eager's outputs and gradients (it does not yet run fast:
docs/performance.md lists the graph breaks that remain and why)."""
from __future__ import annotations

import torch
from torch import nn

import qatkit


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def _quantized() -> tuple[nn.Module, torch.Tensor]:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = _net().eval()
    qatkit.quantize(model, "onnxruntime", (x,))
    qatkit.calibrate(model, [x])
    return model, x


def test_compiled_eval_matches_eager() -> None:
    model, x = _quantized()
    eager = model(x)
    compiled = torch.compile(model)
    assert torch.equal(compiled(x), eager)
    y = torch.rand(2, 3, 16, 16)
    assert torch.equal(compiled(y), model(y))


def test_compiled_train_step_matches_eager() -> None:
    model, x = _quantized()
    model.train()
    twin, _ = _quantized()
    twin.train()
    compiled = torch.compile(twin)
    model(x).square().sum().backward()
    compiled(x).square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name
