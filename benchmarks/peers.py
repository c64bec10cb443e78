"""Adapters for the peer tools of `benchmarks/run.py`: each quantizes the same float model its own documented way.

An adapter has ``ptq(model, batches) -> model`` (a PyTorch model with its fake quantization, calibrated on the
batches), ``qat(model) -> model`` (the trainable model QAT fine-tunes; None when the tool has no QAT path for
a plain nn.Module) and ``export(model, example, path)`` (a QDQ ONNX model for ONNX Runtime). Tool defaults are
kept unless ONNX Runtime needs a switch to run the model at all (noted in each adapter).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import qatkit


class Qatkit:
    name = "qatkit (onnxruntime recipe)"

    def __init__(self, method: str = "mse") -> None:
        self.method = method

    def ptq(self, model: nn.Module, batches: list) -> nn.Module:
        qm = qatkit.quantize(copy.deepcopy(model), "onnxruntime", (batches[0][:1],))
        qatkit.calibrate(qm, batches, method=self.method)
        return qatkit.freeze(qm, bn=True)  # BN frozen from the start of QAT (docs/training.md)

    def qat(self, model: nn.Module) -> nn.Module:
        return model

    def export(self, model: nn.Module, example: torch.Tensor, path: Path) -> Path:
        return qatkit.export_onnx(model, (example,), path)


class NNCF:
    """``nncf.quantize`` with default settings; QAT fine-tunes the returned model (NNCF's documented QAT path).
    Export: NNCF quantizers switched to ONNX QuantizeLinear/DequantizeLinear pairs (their default is OpenVINO's
    FakeQuantize op, which ONNX Runtime cannot run)."""

    name = "NNCF"

    def ptq(self, model: nn.Module, batches: list) -> nn.Module:
        import nncf

        return nncf.quantize(copy.deepcopy(model).eval(), nncf.Dataset(batches), subset_size=len(batches))

    def qat(self, model: nn.Module) -> nn.Module:
        return model

    def export(self, model: nn.Module, example: torch.Tensor, path: Path) -> Path:
        from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

        for m in model.modules():
            if isinstance(m, BaseQuantizer):
                m.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
        return _torch_export(model, example, path)


class ModelOpt:
    """NVIDIA ModelOpt ``mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)`` on CPU; QAT fine-tunes the
    quantized model (ModelOpt's documented QAT path); export with torch.onnx (its quantizers emit Q/DQ)."""

    name = "NVIDIA ModelOpt"

    def ptq(self, model: nn.Module, batches: list) -> nn.Module:
        import modelopt.torch.quantization as mtq

        def forward_loop(m: nn.Module) -> None:
            with torch.no_grad():
                for b in batches:
                    m(b)

        return mtq.quantize(copy.deepcopy(model).eval(), mtq.INT8_DEFAULT_CFG, forward_loop)

    def qat(self, model: nn.Module) -> nn.Module:
        return model

    def export(self, model: nn.Module, example: torch.Tensor, path: Path) -> Path:
        return _torch_export(model, example, path)


class TorchaoPT2E:
    """torchao PT2E with ``X86InductorQuantizer`` (its default config): ``torch.export`` -> ``prepare_pt2e`` ->
    calibrate -> ``convert_pt2e``; QAT with ``prepare_qat_pt2e`` on the train-mode graph. Export: the converted
    graph through torch.onnx's dynamo exporter (PT2E's own route to ONNX)."""

    name = "torchao PT2E (X86InductorQuantizer)"

    def _quantizer(self, is_qat: bool):
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

        return xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat))

    def _exported(self, model: nn.Module, example: torch.Tensor, train: bool) -> nn.Module:
        batch = torch.export.Dim("batch", min=1, max=1024)
        model = copy.deepcopy(model).train(train)
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()

    def ptq(self, model: nn.Module, batches: list) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        self._batches, self._float = batches, model
        prepared = prepare_pt2e(self._exported(model, batches[0], False), self._quantizer(False))
        with torch.no_grad():
            for b in batches:
                prepared(b)
        return _TrainEvalShim(convert_pt2e(prepared))

    def qat(self, model: nn.Module) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        prepared = prepare_qat_pt2e(self._exported(self._float, self._batches[0], True), self._quantizer(True))
        with torch.no_grad():
            for b in self._batches:  # observers see the calibration data before training
                prepared(b)
        return _TrainEvalShim(prepared)

    def after_qat(self, model: nn.Module) -> nn.Module:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        return _TrainEvalShim(convert_pt2e(move_exported_model_to_eval(model.graph_module)))

    def export(self, model: nn.Module, example: torch.Tensor, path: Path) -> Path:
        torch.onnx.export(model.graph_module, (example,), str(path), dynamo=True, opset_version=17,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        return path


class _TrainEvalShim(nn.Module):
    """An exported GraphModule refuses .train()/.eval() (torch.export): the loops' calls become no-ops."""

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.graph_module = graph_module

    def train(self, mode: bool = True) -> "_TrainEvalShim":
        return self

    def forward(self, x):
        return self.graph_module(x)


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    model.eval()
    with torch.no_grad():
        n_out = len(model(example))
    names = [f"output{i}" for i in range(n_out)]
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                      output_names=names, dynamic_axes={n: {0: "batch"} for n in ["images"] + names})
    return path


PEERS = [NNCF, TorchaoPT2E, ModelOpt]
