"""Calibration observes the float model: biases are not rounded to a not-yet-calibrated input scale, so calibrating
a fresh model and re-calibrating a calibrated one see the same tensors and choose the same ranges."""
from __future__ import annotations

import pytest
import torch
from test_export_ort import batches, make_net

import qatkit


def _ranges(model) -> dict[str, tuple[float, float]]:
    return {k: (float(q.range_lo.min()), float(q.range_hi.max()))
            for k, q in qatkit.quantization_state(model).quantizers.items() if not q.dynamic}


@pytest.mark.parametrize("recipe", ["onnxruntime", "tensorrt"])
def test_recalibration_chooses_the_same_ranges(recipe):
    data = batches(3, 2, batch=2)
    model = qatkit.quantize(make_net(), recipe, (data[0],))
    qatkit.calibrate(model, data, method="max")
    first = _ranges(model)
    qatkit.calibrate(model, data, method="max")
    assert _ranges(model) == first


def test_calibration_sees_the_float_outputs():
    """With fake-quant off, the quantized model's forward is the float model's (bias included), up to BN folding."""
    data = batches(4, 1, batch=2)
    float_net = make_net()
    reference = float_net(data[0])
    model = qatkit.quantize(make_net(), "onnxruntime", (data[0],))
    for q in qatkit.quantization_state(model).quantizers.values():
        q.enable_fake_quant(False)
    torch.testing.assert_close(model(data[0]), reference, rtol=1e-4, atol=1e-5)
