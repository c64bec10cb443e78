"""Sensitivity: a model with one deliberately fragile layer ranks it first, and the budget keeps exactly it float."""
from __future__ import annotations

import torch
from torch import nn

import qatkit
from qatkit.analysis.sensitivity import keep_float_recipe, sensitivity, sqnr_metric

RECIPE = {"base": "onnxruntime", "activation": {"bits": 6}}


class Fragile(nn.Module):
    """``head``'s output has one channel offset by 1000: one per-tensor scale crushes its other channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.head.bias[0] = 1000.0

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))


def calibrated(recipe=RECIPE) -> nn.Module:
    model = qatkit.quantize(Fragile().eval(), recipe, (torch.rand(1, 3, 16, 16),))
    qatkit.calibrate(model, [torch.rand(4, 3, 16, 16) for _ in range(2)], method="max")
    return model


def test_the_fragile_layer_ranks_first_and_the_budget_keeps_only_it_float():
    model = calibrated()
    batches = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    metric = sqnr_metric(model, batches)
    built = []

    def requantize(keep):  # what the budget's recipe gives when deployed: re-placed, re-calibrated
        built.append(calibrated(keep_float_recipe(RECIPE, keep)))
        return built[-1]

    report = sensitivity(model, metric, target=25.0, requantize=requantize)
    assert report.groups[0].group == "head"  # keeping it float buys the most
    assert report.groups[0].all_but > report.quantized_metric + 10
    assert min(report.groups, key=lambda g: g.only_quantized).group == "head"  # and alone it costs the most
    assert report.keep_float == ["head"] and report.reached >= 25.0
    assert all(bool(q.fake_quant_enabled) for q in qatkit.quantization_state(model).quantizers.values())
    assert keep_float_recipe(RECIPE, report.keep_float)["rules"] == [{"module_name": "head", "skip": True}]
    assert "head" not in qatkit.quantization_state(built[-1]).sites
