"""qatkit.correct_bias on a model it was not tuned to (torchvision resnet18 and mobilenet_v3_small): lower per-channel
output-mean error against the float model, an export that still verifies in ORT, shifts kept by checkpoints, and
named errors for bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import qatkit
from qatkit.quantize import quantization_state

BLOCKS = {"resnet18": ["layer1.1", "layer2.1", "layer3.1", "layer4.1", "fc"],
          "mobilenet_v3_small": ["features.2", "features.5", "features.8", "features.11", "classifier.3"]}


def _batches(n: int, seed: int, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 3, size, size, generator=g) for _ in range(n)]


def _float(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real inputs, not the defaults (0, 1)
        for x in _batches(4, 10):
            model(x)
    return model.eval()


def _means(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel mean output of the named modules over ``batches``. The hooks only keep the outputs (these
    are read by no in-place op later): an op in a hook would run inside the quantized model's forward."""
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: kept[n].append(y)) for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(ys).transpose(0, 1).flatten(1).mean(1) for n, ys in kept.items()}


def _mean_error(reference: dict, other: dict) -> float:
    return sum((reference[n] - other[n]).abs().mean().item() for n in reference) / len(reference)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_bias_correction_lowers_the_block_output_mean_error(name):
    """On held-out batches, the blocks' per-channel mean outputs move toward the float model's."""
    float_model = _float(name)
    names = BLOCKS[name]
    held_out = _batches(2, 2)
    reference = _means(float_model, names, held_out)
    qm = qatkit.quantize(copy.deepcopy(float_model), "onnxruntime", (held_out[0][:1],))
    calib = _batches(4, 1)
    qatkit.calibrate(qm, calib, method="max")
    before = _mean_error(reference, _means(qm, names, held_out))
    report = qatkit.correct_bias(qm, calib)
    after = _mean_error(reference, _means(qm, names, held_out))
    assert report.layers > 10 and report.mean_abs_shift > 0
    assert after < 0.9 * before, (before, after)


def _corrected(float_model: nn.Module, batches: list[torch.Tensor], correct_on: int) -> nn.Module:
    """A quantized copy of ``float_model`` (onnxruntime recipe), calibrated (max) on ``batches`` and bias-corrected
    on the first ``correct_on`` of them."""
    qm = qatkit.quantize(copy.deepcopy(float_model), "onnxruntime", (batches[0][:1],))
    qatkit.calibrate(qm, batches, method="max")
    qatkit.correct_bias(qm, batches[:correct_on])
    return qm


def test_the_export_after_bias_correction_verifies_in_ort(tmp_path):
    batches = _batches(4, 1)
    qm = _corrected(_float("resnet18"), batches, 2)
    path = qatkit.export_onnx(qm, (batches[0][:1],), tmp_path / "model.qdq.onnx")
    report = qatkit.verify(qm, path, [b[:2] for b in batches[2:]])
    assert report.within_one_step >= 0.999, report


def test_checkpoints_keep_the_shifts(tmp_path):
    """A checkpoint saved after bias correction loads into a freshly quantized model with the same outputs."""
    float_model = _float("resnet18")
    batches = _batches(2, 1)
    qm = _corrected(float_model, batches, 1)
    shifts = dict(quantization_state(qm).bias_shifts.named_buffers())
    assert shifts and any(t.abs().max() > 0 for t in shifts.values())
    qatkit.save(qm, tmp_path / "q.pt")
    loaded = qatkit.load(lambda: copy.deepcopy(float_model), tmp_path / "q.pt", (batches[0][:1],))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batches[1]), qm.eval()(batches[1]))
    # and a layer kept float (fake-quant off) runs without its shift: the float model exactly
    for q in quantization_state(loaded).quantizers.values():
        q.enable_fake_quant(False)
    with torch.no_grad():
        assert torch.allclose(loaded(batches[1]), float_model(batches[1]), atol=1e-4)


def test_bad_input_is_named():
    float_model = _float("resnet18")
    x = _batches(1, 1)[0]
    qm = qatkit.quantize(copy.deepcopy(float_model), "onnxruntime", (x[:1],))
    with pytest.raises(qatkit.NotCalibratedError, match="run qatkit.calibrate"):
        qatkit.correct_bias(qm, [x])
    qatkit.calibrate(qm, [x], method="max")
    with pytest.raises(qatkit.DataError, match="no batches"):
        qatkit.correct_bias(qm, [])
    with pytest.raises(qatkit.DataError, match="NaN or Inf"):
        qatkit.correct_bias(qm, [torch.full_like(x, float("nan"))])
