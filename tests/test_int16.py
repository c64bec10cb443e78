"""16-bit schemes (A16W8 and mixed 8/16 regions): exported as opset-21 QuantizeLinear with int16/uint16 zero points,
run in ONNX Runtime and verified layer by layer in integer codes, as the 8-bit schemes are."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qatkit
from qatkit.export.graph import constant_values
from qatkit.apps.models.detector import DetectorConfig, TinyYolo


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _batches(n: int = 3, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]


def zero_point_types(path) -> dict[str, int]:
    """Container type of every activation QuantizeLinear zero point in the graph -> count."""
    graph = onnx.load(str(path)).graph
    consts = constant_values(graph)
    types: dict[str, int] = {}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            dtype = consts[n.input[2]].dtype.name
            types[dtype] = types.get(dtype, 0) + 1
    return types


def _export_and_verify(model: nn.Module, recipe, path, batches, method: str = "max"):
    qm = qatkit.quantize(model, recipe, (batches[0],))
    qatkit.calibrate(qm, batches, method=method)
    qatkit.export_onnx(qm, (batches[0],), path)
    return qm, qatkit.verify(qm, path, batches)


@pytest.mark.parametrize("base,container", [("onnxruntime", "uint16"), ("tensorrt", "int16")])
def test_a16w8_exports_opset21_and_agrees_with_ort(tmp_path, base, container):
    batches = _batches()
    path = tmp_path / "a16.onnx"
    _, report = _export_and_verify(_net(), {"base": base, "activation": {"bits": 16}}, path, batches)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert not [n for n in model.graph.node if n.domain == "qatkit"]
    assert set(zero_point_types(path)) == {container}
    assert report.within_one_step >= 0.999 and report.max_steps <= 1.0
    assert report.free_running_within_one_step >= 0.999  # 16 bits: rounding flips are 256x smaller than at 8


def test_8bit_export_keeps_opset17(tmp_path):
    batches = _batches()
    path = tmp_path / "a8.onnx"
    _export_and_verify(_net(), "onnxruntime", path, batches)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert set(zero_point_types(path)) == {"uint8"}


def test_mixed_8_16_region_by_rule(tmp_path):
    """16 bits only where a rule says (here the ReLU after the second conv), 8 elsewhere, in one graph."""
    batches = _batches()
    recipe = {"base": "onnxruntime", "rules": [{"module_name": "4", "activation": {"bits": 16}}]}
    path = tmp_path / "mixed.onnx"
    qm, report = _export_and_verify(_net(), recipe, path, batches)
    bits = {q.scheme.bits for q in qatkit.quantization_state(qm).quantizers.values() if not q.dynamic}
    assert bits == {8, 16}
    types = zero_point_types(path)
    assert set(types) == {"uint8", "uint16"}
    assert report.within_one_step >= 0.999 and report.max_steps <= 1.0


def test_16bit_weights_are_int16_constants(tmp_path):
    batches = _batches()
    recipe = {"base": "tensorrt", "activation": {"bits": 16}, "weight": {"bits": 16}}
    path = tmp_path / "w16.onnx"
    _, report = _export_and_verify(_net(), recipe, path, batches)
    model = onnx.load(str(path))
    consts = constant_values(model.graph)
    weight_codes = [consts[n.input[0]] for n in model.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[0]].ndim >= 2]
    assert weight_codes and all(w.dtype == np.int16 for w in weight_codes)
    assert max(int(np.abs(w).max()) for w in weight_codes) > 127  # really uses the 16-bit grid
    assert report.within_one_step >= 0.999


def test_a16w8_demo_detector_mse_calibration(tmp_path):
    """The demo detector under A16W8 with the recipe's own (MSE) calibrator: ORT agrees layer by layer."""
    torch.manual_seed(0)
    model = TinyYolo(DetectorConfig()).eval()
    batches = [torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    path = tmp_path / "demo_a16.onnx"
    _, report = _export_and_verify(model, {"base": "onnxruntime", "activation": {"bits": 16}}, path, batches,
                                   method="mse")
    assert set(zero_point_types(path)) == {"uint16"}
    assert report.within_one_step >= 0.999


def test_more_than_16_bits_is_a_recipe_error():
    with pytest.raises(qatkit.RecipeError, match="bits"):
        qatkit.load_recipe({"base": "onnxruntime", "activation": {"bits": 17}})
