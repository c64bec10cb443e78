"""qatkit inspect: the quantizer table and the placement lint, on real exported graphs and hand-made bad ones."""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qatkit
from qatkit.apps import cli
from qatkit.analysis import inspect as ins


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        z = F.max_pool2d(self.c2(y), 3, 1, 1) + y
        return self.out(torch.cat([y, z], 1))


def exported(tmp_path, recipe: str):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(1, 3, 16, 16)
    qatkit.quantize(net, recipe, (x,))
    qatkit.calibrate(net, [torch.rand(2, 3, 16, 16)], method="max")
    return net, qatkit.export_onnx(net, (x,), tmp_path / f"{recipe}.onnx")


def test_onnxruntime_graph_lints_clean(tmp_path):
    _, path = exported(tmp_path, "onnxruntime")
    # every conv reads int8, every Q has its DQ, the max-pool keeps its input's scale, the concat shares one
    assert ins.lint_onnx(path) == {}
    rows = ins.onnx_rows(path)
    assert any(r.scheme == "constant" for r in rows) and any(r.scheme == "activation" for r in rows)
    assert cli.main(["inspect", str(path), "--strict"]) == 0


def test_lint_sees_concat_scales_when_sharing_is_off(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(1, 3, 16, 16)
    qatkit.quantize(net, {"base": "onnxruntime", "share_concat_scales": False}, (x,))
    qatkit.calibrate(net, [torch.rand(2, 3, 16, 16)], method="max")
    path = qatkit.export_onnx(net, (x,), tmp_path / "unshared.onnx")
    assert ins.lint_onnx(path) == {"concat inputs with different scales": 1}
    assert cli.main(["inspect", str(path), "--strict"]) == 1


def test_tensorrt_graph_reports_its_float_output_conv(tmp_path):
    _, path = exported(tmp_path, "tensorrt")
    # the recipe keeps the output conv float on purpose (export metadata says so): reported, not a problem
    assert ins.lint_onnx(path) == {ins.KEPT_FLOAT: 1}
    assert cli.main(["inspect", str(path), "--strict"]) == 0
    # the same graph without qatkit's metadata (any other tool's file): a float conv input is a problem
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    assert ins.lint_onnx(tmp_path / "foreign.onnx") == {"conv/linear inputs not quantized": 1}
    assert cli.main(["inspect", str(tmp_path / "foreign.onnx"), "--strict"]) == 1


def test_tensorrt_concat_inputs_share_one_scale_and_the_lint_sees_it(tmp_path):
    def lint(share: bool) -> dict[str, int]:
        torch.manual_seed(0)
        net = Net().eval()  # the output conv int8 too, so the concat feeds a Q
        recipe = {"base": "tensorrt", "keep_output_convs_float": False, "share_concat_scales": share}
        qatkit.quantize(net, recipe, (torch.rand(1, 3, 16, 16),))
        qatkit.calibrate(net, [torch.rand(2, 3, 16, 16)], method="max")
        return ins.lint_onnx(qatkit.export_onnx(net, (torch.rand(1, 3, 16, 16),), tmp_path / f"{share}.onnx"))

    assert lint(True) == {}
    assert lint(False) == {"concat inputs with different scales": 1}


def test_model_table_and_lint(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    qatkit.quantize(net, "onnxruntime", (torch.rand(1, 3, 16, 16),))
    state = qatkit.quantization_state(net)
    rows = ins.model_rows(net)
    assert len(rows) == len(state.quantizers)
    n_act = sum(not (q.dynamic or q.fixed_range) for q in state.quantizers.values())
    assert 0 < n_act < sum(not q.dynamic for q in state.quantizers.values())  # (the SiLU's sigmoid: [0, 1] fixed)
    assert ins.lint_model(net)["uncalibrated quantizers"] == n_act  # weights compute their own scale
    assert sum("NOT CALIBRATED" in r.state for r in rows) == n_act
    assert all(r.uses >= 1 for r in rows)
    qatkit.calibrate(net, [torch.rand(2, 3, 16, 16)], method="max")
    assert ins.problems(ins.lint_model(net)) == 0
    report = ins.format_report(ins.model_rows(net), ins.lint_model(net))
    assert "nothing to report" in report and "c1.0/weight" in report


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def test_lint_finds_concat_scale_mismatch_and_dangling_quantize(tmp_path):
    inits = [_const("s1", np.float32(0.1)), _const("s2", np.float32(0.2)), _const("z", np.uint8(0))]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "s1", "z"], ["aq"]),
        helper.make_node("DequantizeLinear", ["aq", "s1", "z"], ["ad"]),
        helper.make_node("QuantizeLinear", ["b", "s2", "z"], ["bq"]),
        helper.make_node("DequantizeLinear", ["bq", "s2", "z"], ["bd"]),
        helper.make_node("Concat", ["ad", "bd"], ["c"], axis=1),
        helper.make_node("QuantizeLinear", ["c", "s1", "z"], ["cq"]),  # no DequantizeLinear after it
    ]
    vi = lambda n, t: helper.make_tensor_value_info(n, t, [1, 2])  # noqa: E731
    graph = helper.make_graph(nodes, "bad", [vi("a", TensorProto.FLOAT), vi("b", TensorProto.FLOAT)],
                              [vi("cq", TensorProto.UINT8)], inits)
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    lint = ins.lint_onnx(path)
    assert lint == {"concat inputs with different scales": 1, "QuantizeLinear without DequantizeLinear": 1}
    assert cli.main(["inspect", str(path), "--strict"]) == 1
    assert cli.main(["inspect", str(path)]) == 0


def test_inspect_missing_file_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err

