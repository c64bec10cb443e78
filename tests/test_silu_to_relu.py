"""Recipe switch silu_to_relu (seed 002): SiLU modules and functional F.silu become ReLU, names and keys unchanged."""
from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F
from torch import nn

import qatkit


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv3(F.silu(self.conv2(self.act(self.conv1(x)))))


def relu_reference(net: Net, x: torch.Tensor) -> torch.Tensor:
    return net.conv3(F.relu(net.conv2(F.relu(net.conv1(x)))))


def test_silu_becomes_relu_for_modules_and_functional_calls(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    keys = set(net.state_dict())
    x = torch.rand(2, 3, 8, 8)
    qatkit.quantize(net, {"base": "onnxruntime", "silu_to_relu": True}, (x[:1],))
    assert isinstance(net.act, nn.ReLU) and not any(isinstance(m, nn.SiLU) for m in net.modules())
    assert keys <= set(net.state_dict())
    qatkit.calibrate(net, [x], method="max")
    for q in qatkit.quantization_state(net).quantizers.values():
        q.enable_fake_quant(False)
    with torch.no_grad():
        torch.testing.assert_close(net(x), relu_reference(net, x))
    for q in qatkit.quantization_state(net).quantizers.values():
        q.enable_fake_quant(True)
    path = qatkit.export_onnx(net, (x[:1],), tmp_path / "relu.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Sigmoid" not in ops and "Relu" in ops
    assert qatkit.verify(net, path, [x]).within_one_step >= 0.999


def test_without_the_switch_silu_stays():
    net = Net().eval()
    qatkit.quantize(net, "onnxruntime", (torch.rand(1, 3, 8, 8),))
    assert isinstance(net.act, nn.SiLU)
