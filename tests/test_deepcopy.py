"""A deep copy of a quantized model (what every EMA makes) runs quantized, on its own quantizers."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

import qatkit
from qatkit.errors import QatkitWarning


class Outer(nn.Module):
    """Calls the layers of a child Sequential from its own forward, as ultralytics' DetectionModel does: the layers
    are not children of the module that calls them, so their names come from the root's module table."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model:
            x = layer(x)
        return x + 1.0


def _quantized() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    model = Outer().eval()
    qatkit.quantize(model, "onnxruntime", (x,))
    qatkit.calibrate(model, [x, torch.rand(2, 3, 16, 16)])
    return model, x


def test_copy_runs_quantized_without_warnings() -> None:
    model, x = _quantized()
    copied = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QatkitWarning)  # a key the copy cannot name would warn and run float
        assert torch.equal(copied(x), model(x))
    qatkit.quantization_state(copied).detach()  # float again: the copy was quantizing
    assert not torch.equal(copied(x), model(x))


def test_copy_uses_its_own_quantizers() -> None:
    model, x = _quantized()
    before = model(x)
    copied = copy.deepcopy(model)
    state = qatkit.quantization_state(copied)
    for q in state.quantizers.values():
        if not q.dynamic and q.range_hi.numel() == 1:
            q.set_range(q.range_lo * 4, q.range_hi * 4)  # coarser grids: other outputs
    assert not torch.equal(copied(x), before)
    assert torch.equal(model(x), before)  # the original's quantizers are untouched
