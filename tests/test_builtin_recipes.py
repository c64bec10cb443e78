"""Every built-in recipe, end to end on a small YOLO-like net: quantize, calibrate, train a step, export, verify."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit
from qatkit.analysis.inspect import lint_onnx


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = self.stem(x)
        z = F.interpolate(F.max_pool2d(self.branch(y), 2), scale_factor=2.0) + y
        return self.head(torch.cat([y, z], 1))


def test_the_four_recipes_are_built_in():
    assert {"onnxruntime", "tensorrt", "npu-uint8", "npu-int8-sym"} <= set(qatkit.builtin_recipes())
    assert all(qatkit.load_recipe(n).description for n in qatkit.builtin_recipes())


@pytest.mark.parametrize("recipe", ["onnxruntime", "tensorrt", "npu-uint8", "npu-int8-sym"])
def test_recipe_round_trip(recipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Net().eval()
    x = torch.rand(1, 3, 32, 32, generator=g)
    qatkit.quantize(net, recipe, (x,))
    qatkit.calibrate(net, [torch.rand(2, 3, 32, 32, generator=g) for _ in range(2)])
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    net(torch.rand(2, 3, 32, 32, generator=g)).square().mean().backward()
    opt.step()
    path = qatkit.export_onnx(net, (x,), tmp_path / f"{recipe}.onnx")
    report = qatkit.verify(net, path, [torch.rand(2, 3, 32, 32, generator=g)])
    assert report.within_one_step >= 0.999, report
    assert "QuantizeLinear without DequantizeLinear" not in lint_onnx(path)


def test_npu_recipes_follow_their_seeds():
    x = torch.rand(1, 3, 32, 32)
    sym = qatkit.quantize(Net().eval(), "npu-int8-sym", (x,))
    state = qatkit.quantization_state(sym)
    assert state.outputs == [None]  # seed 001: the head's output is not quantized
    acts = [q for q in state.quantizers.values() if not q.dynamic]
    assert all(q.scheme.qmin < 0 and q.scheme.symmetric and q.scheme.scale_mode == "fixed" for q in acts)

    ema = qatkit.quantize(Net().eval(), "npu-uint8", (x,))
    qatkit.calibrate(ema, [torch.rand(2, 3, 32, 32)])
    q = qatkit.quantization_state(ema).q("input0")
    before = float(q.scale)
    ema.train()
    ema(torch.rand(2, 3, 32, 32) * 4)  # wider inputs: seed 000's moving-average ranges follow them in training
    assert float(q.scale) > before
