"""Export's Softmax rewrite (qatkit.export.softmax): an inner-axis float Softmax, as YOLOv8's DFL takes it, becomes
ReduceMax/Sub/Exp/ReduceSum/Div under the ``onnxruntime`` recipe; ORT then computes the same values."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qatkit
from qatkit.export.softmax import decompose_softmax


class DflNet(nn.Module):
    """A conv stem, a box branch decoded like YOLOv8's DFL (softmax over 16 bins on axis 1, then a fixed 1x1
    conv), and a class branch with a softmax over its last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.box = nn.Conv2d(16, 64, 1)
        self.cls = nn.Conv2d(16, 5, 1)
        self.dfl = nn.Conv2d(16, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(16, dtype=torch.float).view(1, 16, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        box = self.box(x).view(b, 4, 16, h * w).transpose(2, 1).softmax(1)
        box = self.dfl(box).view(b, 4, h * w)
        cls = self.cls(x).flatten(2).softmax(-1)
        return torch.cat([box, cls], 1)


def softmax_axes(model: onnx.ModelProto) -> list[int]:
    return [next((a.i for a in n.attribute if a.name == "axis"), -1) for n in model.graph.node
            if n.op_type == "Softmax"]


def run(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    net = DflNet().eval()
    x = torch.rand(2, 3, 32, 32)
    qatkit.quantize(net, "onnxruntime", (x,))
    qatkit.calibrate(net, [torch.rand(2, 3, 32, 32) for _ in range(2)], method="max")
    return net, x


def test_onnxruntime_recipe_decomposes_the_inner_axis_softmax_only(quantized, tmp_path):
    net, x = quantized
    path = qatkit.export_onnx(net, (x,), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert softmax_axes(model) == [-1], "the last-axis softmax stays, the DFL's axis-1 softmax goes"
    assert {"ReduceMax", "Exp", "ReduceSum", "Div"} <= set(ops)
    native = qatkit.export_onnx(net, (x,), tmp_path / "native.onnx", decompose_softmax=False)
    assert sorted(softmax_axes(onnx.load(str(native)))) == [-1, 1]
    np.testing.assert_allclose(run(path, x), run(native, x), rtol=0, atol=1e-5)
    report = qatkit.verify(net, path, [x])
    assert report.within_one_step >= 0.999, report.worst_layers


def test_tensorrt_recipe_and_float_export_keep_softmax_unless_asked(tmp_path):
    torch.manual_seed(0)
    float_net, x = DflNet().eval(), torch.rand(1, 3, 32, 32)
    plain = qatkit.export_onnx(float_net, (x,), tmp_path / "float.onnx")
    assert sorted(softmax_axes(onnx.load(str(plain)))) == [-1, 1]
    asked = qatkit.export_onnx(float_net, (x,), tmp_path / "float_fast.onnx", decompose_softmax=True)
    assert softmax_axes(onnx.load(str(asked))) == [-1]
    np.testing.assert_allclose(run(asked, x), run(plain, x), rtol=0, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(run(asked, x), float_net(x).numpy(), rtol=0, atol=1e-4)
    qatkit.quantize(float_net, "tensorrt", (x,))
    qatkit.calibrate(float_net, [x], method="max")
    trt = qatkit.export_onnx(float_net, (x,), tmp_path / "trt.onnx")
    assert sorted(softmax_axes(onnx.load(str(trt)))) == [-1, 1]


def graph_with_softmax(axis: int, opset: int, *, quantized: bool = False, rank: int = 4) -> onnx.ModelProto:
    """x -> Softmax(axis) -> y, optionally between DequantizeLinear and QuantizeLinear (uint8, scale 1/255)."""
    shape = [1, 16, 4, 7][:rank]
    inits, nodes, src, dst = [], [], "x", "y"
    if quantized:
        inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes.append(helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]))
        src, dst = "xq", "yq"
    nodes.append(helper.make_node("Softmax", ["x"], ["y"], axis=axis))
    if quantized:
        nodes.append(helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]))
    kind = TensorProto.UINT8 if quantized else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(src, kind, shape)],
                              [helper.make_tensor_value_info(dst, kind, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("axis", [0, 1, 2, -2])
def test_decomposed_softmax_computes_softmax_in_ort(opset, axis):
    model = graph_with_softmax(axis, opset)
    x = (np.random.default_rng(opset).standard_normal((1, 16, 4, 7)) * 30).astype(np.float32)
    expected = torch.softmax(torch.from_numpy(x), axis).numpy()
    assert decompose_softmax(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert "Softmax" not in [n.op_type for n in model.graph.node]
    assert model.graph.node[-1].output[0] == "y", "the output keeps its name (layer-wise verify finds it)"
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["last axis", "last axis as -1", "quantized", "opset 12", "unknown rank"])
def test_softmax_left_alone(case):
    model = {"last axis": lambda: graph_with_softmax(3, 17),
             "last axis as -1": lambda: graph_with_softmax(-1, 17),
             "quantized": lambda: graph_with_softmax(1, 17, quantized=True),
             "opset 12": lambda: graph_with_softmax(1, 12, rank=2),
             "unknown rank": lambda: graph_with_softmax(1, 17)}[case]()
    if case == "unknown rank":
        model.graph.input[0].type.tensor_type.ClearField("shape")
        model.graph.output[0].type.tensor_type.ClearField("shape")
    before = model.SerializeToString()
    assert decompose_softmax(model) == 0
    assert model.SerializeToString() == before
