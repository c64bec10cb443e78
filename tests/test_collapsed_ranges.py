"""Collapsed ranges (dead channels, constant tensors): scales stay at or above the floor, ORT runs the model, and
``qatkit inspect`` lists what collapsed and the scale qatkit chose (issue #11)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import qatkit
from qatkit.export.graph import constant_tensors
from qatkit.apps import cli
from qatkit.analysis import inspect as ins
from qatkit.quant.qparams import MIN_RANGE, range_to_qparams, scale_floor

X = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class DeadNet(nn.Module):
    """conv: channel 0 dead (all zero), channel 1 near-dead (|w| <= 3e-5). ``y * 0`` is a constant-zero tensor,
    ``y * 1e-7`` a tensor whose range is below the floor. ``const`` is a dead layer (zero weights; calibration observes
    the float model, so its output is the constant 1e-6 bias: a range below the floor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.const = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.conv.weight[0].zero_()
            self.conv.bias[0] = 0.0
            self.conv.weight[1] = torch.linspace(-3e-5, 3e-5, 27).reshape(3, 3, 3)
            self.const.weight.zero_()
            self.const.bias.fill_(1e-6)

    def forward(self, x):
        y = F.relu(self.conv(x))
        z, tiny = y * 0.0, y * 1e-7
        return self.head(y + z + tiny) + self.const(y)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    net = qatkit.quantize(DeadNet().eval(), "onnxruntime", (X,))
    qatkit.calibrate(net, [torch.rand(4, 3, 8, 8) for _ in range(2)], method="max")
    return net


def test_scales_of_collapsed_ranges(calibrated):
    state = qatkit.quantization_state(calibrated)
    w = state.quantizers["conv/weight"]
    floor = scale_floor(w.scheme.qmin, w.scheme.qmax)
    assert float(w.scale[0]) == 1.0  # dead channel: any scale codes it as 0; 1.0 keeps its bias far from int32
    assert float(w.scale[1]) == pytest.approx(floor, rel=1e-6)  # near-dead: the floor, not 3e-5 / 63
    assert (w.scale[2:] > 10 * floor).all()  # the live channels keep their own scales
    assert float(state.quantizers["/mul#0/output"].scale) == 1.0  # constant zero
    tiny = state.quantizers["/mul#1/output"]
    assert float(tiny.scale) == pytest.approx(scale_floor(tiny.scheme.qmin, tiny.scheme.qmax), rel=1e-6)


def test_floor_is_a_range_so_16_bit_grids_keep_fine_scales():
    # a legitimate 16-bit tensor with range 0.01: scale 0.01 / 65535, far below 8-bit floors, untouched
    scale, _ = range_to_qparams(0.0, 0.01, 0, 65535, False)
    assert float(scale) == pytest.approx(0.01 / 65535, rel=1e-6)
    # the same range on 8 bits, and a range below MIN_RANGE on both
    assert float(range_to_qparams(0.0, 0.01, 0, 255, False)[0]) == pytest.approx(0.01 / 255, rel=1e-6)
    for qmax in (255, 65535):
        assert float(range_to_qparams(0.0, 1e-9, 0, qmax, False)[0]) == pytest.approx(MIN_RANGE / qmax, rel=1e-6)


def test_export_runs_in_ort_with_every_scale_positive_and_at_or_above_the_floor(calibrated, tmp_path):
    path = qatkit.export_onnx(calibrated, (X,), tmp_path / "dead.onnx")
    model = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
               if n.op_type == "Constant"}
    scales = [(consts[n.input[1]], consts.get(n.input[0])) for n in model.graph.node
              if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(scales) > 8
    for scale, codes in scales:
        assert np.isfinite(scale).all() and (scale > 0).all()
        if codes is None or codes.dtype != np.int32:  # int32 biases are on s_in * s_w by definition
            assert (scale >= MIN_RANGE / 255 * (1 - 1e-6)).all(), scale
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 8, 8)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.isfinite(out).all()
    assert qatkit.verify(calibrated, path, [x]).within_one_step >= 0.999
    # inspect on the ONNX file: the dead and floored weight channels and the floored activation, no problem
    notes = {r.name: r.collapsed for r in ins.onnx_rows(path) if r.collapsed}
    assert any("1 of 8 channels had all codes zero: scale 1.0" in v and "1 of 8 channels had a range below "
               "0.0001" in v for v in notes.values()), notes
    assert any(v.startswith("range below 0.0001: scale set to the floor 3.92e-07") for v in notes.values()), notes
    lint = ins.lint_onnx(path)
    assert lint[ins.COLLAPSED] == len(notes) and ins.problems(lint) == 0
    assert cli.main(["inspect", str(path), "--strict"]) == 0


def test_inspect_lists_the_collapsed_quantizers_of_a_model(calibrated):
    rows = {r.name: r.collapsed for r in ins.model_rows(calibrated)}
    assert rows["conv/weight"] == ("1 of 8 channels had zero range: scale 1.0; 1 of 8 channels had a range "
                                   "below 0.0001: scale set to the floor 7.87e-07")
    assert rows["/mul#0/output"] == "constant tensor (zero range): scale 1.0"
    assert rows["/mul#1/output"] == "range below 0.0001: scale set to the floor 3.92e-07"
    assert rows["const/output"] == "range below 0.0001: scale set to the floor 3.92e-07"
    assert rows["const/weight"].startswith("4 of 4 channels had zero range: scale 1.0 (a dead layer")
    assert rows["head/weight"] == ""
    lint = ins.lint_model(calibrated)
    assert lint == {ins.COLLAPSED: 5} and ins.problems(lint) == 0
    report = ins.format_report(ins.model_rows(calibrated), lint)
    assert "collapsed ranges" in report and "  /mul#0/output: constant tensor (zero range): scale 1.0" in report


def test_a_foreign_onnx_scale_below_the_floor_is_a_problem(calibrated, tmp_path):
    model = onnx.load(str(qatkit.export_onnx(calibrated, (X,), tmp_path / "m.onnx")))
    name = next(n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear")
    scale = constant_tensors(model.graph)[name]  # an initializer (qatkit's export) or a Constant node (others')
    scale.CopyFrom(numpy_helper.from_array(np.float32(1e-12), scale.name))  # aimet#4054's kind of scale, and smaller
    onnx.save(model, str(tmp_path / "tiny.onnx"))
    assert ins.lint_onnx(tmp_path / "tiny.onnx")["scales below the floor (scale x grid < 0.0001)"] >= 1
    assert cli.main(["inspect", str(tmp_path / "tiny.onnx"), "--strict"]) == 1
