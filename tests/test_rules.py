"""Recipe rules: priority (global < object_type < module_name_regex < module_name), skip, float outputs,
per-layer bit-widths (W4 weights, 6-bit activations) exported and verified in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from nets import Block

import qatkit
from qatkit.recipes.rules import Rule, resolve


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = Block(8)
        self.b2 = Block(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.b2(self.b1(x) + x)
        return self.head(x)


X = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def quantized(recipe) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = Net().eval()
    return qatkit.quantize(net, recipe, (X,))


def weight_bits(net: Net) -> dict[str, int]:
    state = qatkit.quantization_state(net)
    return {k.split("/")[0].replace(":", "."): q.scheme.bits for k, q in state.quantizers.items() if q.dynamic}


def test_priority_global_type_regex_name():
    net = quantized({"base": "onnxruntime", "rules": [
        {"module_name": "b2", "weight": {"bits": 4}},           # most specific, listed first on purpose
        {"module_name_regex": r"b\d", "weight": {"bits": 5}},
        {"object_type": "Conv2d", "weight": {"bits": 6}},
    ]})
    assert weight_bits(net) == {"stem": 6, "b1.conv": 5, "b2.conv": 4, "head": 6}  # global is 7


def test_later_rule_wins_and_deeper_module_name_wins():
    base = qatkit.load_recipe("onnxruntime")
    rules = [Rule(module_name="b1", weight={"bits": 5}), Rule(module_name="b1.conv", weight={"bits": 3}),
             Rule(module_name="b1", weight={"bits": 6})]
    assert resolve(rules, base.activation, base.weight, "b1.conv", ["Conv2d"]).weight.bits == 3
    assert resolve(rules, base.activation, base.weight, "b1.act", ["SiLU"]).weight.bits == 6


def test_object_type_matches_enclosing_modules_and_functional_ops():
    net = quantized({"base": "onnxruntime", "rules": [
        {"object_type": "Block", "activation": {"bits": 6}},
        {"object_type": "add", "quantize_output": False},
    ]})
    state = qatkit.quantization_state(net)
    bits = {q.name: q.scheme.bits for q in state.quantizers.values() if not q.dynamic}
    assert bits["b1.act/output"] == 6 and bits["b1.conv/output"] == 6 and bits["stem/output"] == 8
    assert "/add#0" not in state.sites  # the add stays float (no site at all): b2.conv quantizes its own input
    assert state.sites["b2.conv"].inputs


def test_skip_rule_and_float_output_export_and_verify(tmp_path):
    net = quantized({"base": "onnxruntime", "rules": [
        {"module_name": "b1", "skip": True},
        {"module_name": "head", "quantize_output": False},
    ]})
    state = qatkit.quantization_state(net)
    assert not any(k.startswith("b1.") for k in state.sites)
    assert state.outputs == [None]
    qatkit.calibrate(net, [torch.rand(2, 3, 16, 16)], method="max")
    path = qatkit.export_onnx(net, (X,), tmp_path / "m.onnx")
    report = qatkit.verify(net, path, [torch.rand(2, 3, 16, 16)])
    assert report.within_one_step >= 0.999, report


def test_w4_weights_and_6_bit_activations_round_trip_in_ort(tmp_path):
    net = quantized({"base": "onnxruntime", "weight": {"bits": 4},
                     "rules": [{"module_name": "b2", "activation": {"bits": 6}}]})
    qatkit.calibrate(net, [torch.rand(2, 3, 16, 16) for _ in range(2)], method="max")
    path = qatkit.export_onnx(net, (X,), tmp_path / "w4.onnx")
    model = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
               if n.op_type == "Constant"}
    weights = [consts[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in consts and consts[n.input[0]].dtype == np.int8 and consts[n.input[0]].ndim == 4]
    assert len(weights) == 4 and all(w.min() >= -8 and w.max() <= 7 for w in weights)
    assert any(n.op_type == "Clip" for n in model.graph.node)  # 6-bit grid inside the uint8 container
    report = qatkit.verify(net, path, [torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16) * 3])
    assert report.within_one_step >= 0.999, report


@pytest.mark.parametrize("rule, message", [
    ({"module_nam": "b1"}, "module_nam"),
    ({"module_name": "b1", "weight": {"bitz": 4}}, "bitz"),
    ({"skip": True}, "exactly one of"),
    ({"module_name_regex": "b(", "skip": True}, "not a valid regex"),
])
def test_bad_rules_name_the_problem(rule, message):
    with pytest.raises(qatkit.RecipeError, match=message):
        qatkit.load_recipe({"base": "tensorrt", "rules": [rule]})


def test_quantize_output_false_on_a_block_leaves_only_its_boundary_float():
    net = quantized({"base": "onnxruntime", "rules": [{"module_name": "b1", "quantize_output": False}]})
    names = {q.name for q in qatkit.quantization_state(net).quantizers.values()}
    assert "b1.conv/output" in names  # inside the block: still quantized
    assert "b1.act/output" not in names and "b2.act/output" in names  # what leaves b1 is float
    assert "/add#0/input0" in names  # ...so the add that reads it quantizes its own input


class UpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2.0), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.up(self.stem(x)))


def test_quantize_input_adds_qdq_at_a_module_boundary_under_tensorrt(tmp_path):
    def build(rules):
        torch.manual_seed(0)
        return qatkit.quantize(UpNet().eval(), {"base": "tensorrt", "keep_output_convs_float": False,
                                                "rules": rules}, (X,))

    assert "up.0" not in qatkit.quantization_state(build([])).sites  # TensorRT placement: conv inputs only
    net = build([{"module_name": "up", "quantize_input": True}])
    assert qatkit.quantization_state(net).sites["up.0"].inputs == {0: "stem/output0"}
    qatkit.calibrate(net, [torch.rand(2, 3, 16, 16)], method="max")
    path = qatkit.export_onnx(net, (X,), tmp_path / "up.onnx")
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    resize = next(n for n in graph.node if n.op_type == "Resize")
    assert producer[resize.input[0]] == "DequantizeLinear"  # the upsample reads int8
    assert qatkit.verify(net, path, [torch.rand(2, 3, 16, 16)]).within_one_step >= 0.999
