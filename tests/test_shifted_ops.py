"""Functional ops are matched by their order within a module's forward; a forward whose ops differ between calls
(cached anchors) must stop with an error naming the fix, not put quantizers on other tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qatkit
from qatkit.errors import QatkitError


class Head(nn.Module):
    """Adds a grid computed from the input's shape on the first call only (as ultralytics caches its anchors)."""

    def __init__(self, dynamic: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.dynamic, self.shape, self.grid = dynamic, None, None

    def forward(self, y):
        if self.dynamic or self.shape != y.shape:
            self.grid = torch.arange(y.shape[-1]).type_as(y) + 0.5  # an add that reads y's dtype only
            self.shape = y.shape
        return self.conv(y + self.grid)


class CachedGrid(nn.Module):
    def __init__(self, dynamic: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = Head(dynamic)

    def forward(self, x):
        return self.head(self.stem(x))


@pytest.mark.parametrize("recipe", ["onnxruntime", "npu-uint8"])
def test_ops_shifted_by_first_call_code_raise_naming_the_fix(recipe):
    net = CachedGrid().eval()
    qatkit.quantize(net, recipe, (torch.rand(1, 3, 8, 8),))
    with pytest.raises(QatkitError, match=r"'head/add#0' runs with 2 tensor input\(s\) where capture saw 1.*"
                                          r"matched by their order.*same ops on every call"):
        qatkit.calibrate(net, [torch.rand(1, 3, 8, 8)], method="max")


def test_the_same_model_running_the_same_ops_every_call_calibrates_and_exports(tmp_path):
    net = CachedGrid(dynamic=True).eval()
    x = torch.rand(1, 3, 8, 8)
    qatkit.quantize(net, "onnxruntime", (x,))
    qatkit.calibrate(net, [torch.rand(1, 3, 8, 8) for _ in range(2)], method="max")
    path = qatkit.export_onnx(net, (x,), tmp_path / "m.onnx")
    assert qatkit.verify(net, path, [x]).within_one_step >= 0.999


def test_yolov8n_head_decode_quantized_needs_a_dynamic_head():
    ultralytics = pytest.importorskip("ultralytics")  # noqa: F841 - the model below comes from it
    from ultralytics.nn.tasks import DetectionModel

    recipe = {"base": "onnxruntime", "keep_head_decode_float": False}
    x = torch.rand(1, 3, 64, 64)
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    qatkit.quantize(model, recipe, (x,))
    with pytest.raises(QatkitError, match=r"model\.22.*dynamic = True"):
        qatkit.calibrate(model, [torch.rand(1, 3, 64, 64)], method="max")
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    model.model[-1].dynamic = True
    qatkit.quantize(model, recipe, (x,))
    assert qatkit.calibrate(model, [torch.rand(1, 3, 64, 64)], method="max").batches == 1
    assert not qatkit.uncalibrated(model)
