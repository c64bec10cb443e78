"""Verify: run the exported ONNX model in ONNX Runtime and compare it with the PyTorch model it came from.

Two comparisons, because a deep quantized network is chaotic with respect to rounding: one value that lands on the
other side of a rounding boundary (float summation order differs between any two libraries) shifts its
consumers by a fraction of a step, which flips some of *their* roundings, and so on. Measured on the demo detector
even with ORT's optimisations off, free-running outputs agree within one step for only ~90 % of values, while mAP
agrees to 0.001. So:

* **layer-wise (teacher-forced)**: ORT runs once with every activation QuantizeLinear output exposed; PyTorch then
  runs with each quantizer's result replaced by ORT's value for that tensor (same execution order as the ONNX
  graph), and each tensor is compared in integer codes. This checks that every layer in the runtime computes what
  PyTorch computes from the same inputs. ``within_one_step`` is the share of all quantized values (every layer,
  model outputs included) within one step; ``outputs_within_one_step`` the share for the model outputs.
* **free-running**: plain runs both ways (``free_running_within_one_step``) and, with a dataset, mAP both ways.
The step of a float model output (e.g. TensorRT's float output convs) is one 8-bit step of its range.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .calibrate import check_finite
from .capture import tensors_of
from .errors import DataError, QatkitError
from .onnx_runtime import predictor, session
from .quant.quantizer import FakeQuantizer
from .quantize import as_inputs, quantization_state

STEP_TOLERANCE = 1e-4  # relative slack on "one step" for float rounding in the comparison itself


@dataclass
class VerifyReport:
    within_one_step: float  # teacher-forced, all quantized tensors and outputs
    outputs_within_one_step: float  # teacher-forced, model outputs
    free_running_within_one_step: float
    max_steps: float  # teacher-forced worst difference, in steps
    free_running_max_steps: float
    values: int
    batches: int
    steps: list[float]
    worst_layers: list[tuple[str, float]] = field(default_factory=list)  # (quantizer, share beyond one step)
    tapped_outputs_identical: bool = True  # exposing intermediates did not change ORT's model outputs
    torch_map: float | None = None
    onnx_map: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class _Tally:
    def __init__(self) -> None:
        self.within = self.total = 0
        self.max_steps = 0.0

    def add(self, diff_steps: torch.Tensor) -> None:
        self.within += int((diff_steps <= 1 + STEP_TOLERANCE).sum())
        self.total += diff_steps.numel()
        self.max_steps = max(self.max_steps, float(diff_steps.max()) if diff_steps.numel() else 0.0)

    @property
    def share(self) -> float:
        return self.within / max(self.total, 1)


def _activation_quantize_outputs(model: onnx.ModelProto) -> list[str]:
    """Outputs of QuantizeLinear nodes on activations (weights are stored as integers, not quantized in-graph)."""
    const = {t.name for t in model.graph.initializer}
    const |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in const]


def _tapped_copy(onnx_path: Path, folder: Path) -> tuple[Path, int]:
    """The model with every activation QuantizeLinear output added as a graph output."""
    model = onnx.load(str(onnx_path))
    names = _activation_quantize_outputs(model)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    path = folder / "tapped.onnx"
    onnx.save(model, str(path))
    return path, len(names)


class _Forcer:
    """Replaces the k-th activation quantizer result with ORT's k-th tensor and tallies the code differences."""

    def __init__(self, codes: list[np.ndarray], tally: _Tally, per_layer: dict[str, _Tally]) -> None:
        self.codes, self.tally, self.per_layer, self.k = codes, tally, per_layer, 0

    def __call__(self, q: FakeQuantizer, y: torch.Tensor) -> torch.Tensor:
        if self.k >= len(self.codes):
            raise QatkitError("verify: PyTorch applied more quantizers than the ONNX graph holds; re-export the model")
        ort = torch.from_numpy(self.codes[self.k].astype(np.float32))
        self.k += 1
        scale, zp = q.scale.detach().float(), q.zero_point.detach().float()
        if ort.shape != y.shape or scale.numel() != 1:
            raise QatkitError(f"verify: tensor {self.k - 1} ({q.name}) does not line up with the ONNX graph")
        diff = (torch.round(y.detach() / scale) + zp - ort).abs()
        self.tally.add(diff)
        self.per_layer.setdefault(q.name, _Tally()).add(diff)
        return ((ort - zp) * scale).to(y.dtype)


def _output_steps(model: nn.Module, outs: list[list[torch.Tensor]]) -> list[float]:
    keys = quantization_state(model).outputs if hasattr(model, "_qatkit") else []
    steps = []
    for i in range(len(outs[0])):
        key = keys[i] if i < len(keys) else None
        if key is not None:
            steps.append(float(quantization_state(model).q(key).scale.max()))
        else:
            lo, hi = min(float(o[i].min()) for o in outs), max(float(o[i].max()) for o in outs)
            steps.append(max(hi - lo, 1e-12) / 255.0)
    return steps


def _as_list(out) -> list[torch.Tensor]:
    return [t.float() for t in tensors_of(out)]


@torch.no_grad()
def verify(model: nn.Module, onnx_path: str | Path, batches: Iterable, *, dataset=None,
           threads: int | None = None) -> VerifyReport:
    """Compare ``model`` (PyTorch) and ``onnx_path`` (ORT) on ``batches``; with ``dataset``, also mAP both ways."""
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = _verify(model, Path(onnx_path), batches, Path(tmp), threads)
        if dataset is not None:
            from .eval.detect import evaluate, torch_predictor

            report.onnx_map = evaluate(predictor(session(onnx_path, threads)), dataset)["map"]
            report.torch_map = evaluate(torch_predictor(model), dataset)["map"]
        return report
    finally:
        model.train(was_training)


def _verify(model: nn.Module, onnx_path: Path, batches: Iterable, tmp: Path, threads: int | None) -> VerifyReport:
    plain = session(onnx_path, threads)
    quantized = hasattr(model, "_qatkit")
    tapped_path, n_taps = _tapped_copy(onnx_path, tmp) if quantized else (onnx_path, 0)
    tapped = session(tapped_path, threads)
    names = [i.name for i in plain.get_inputs()]
    n_out = len(plain.get_outputs())
    free, forced = [], []  # (torch outputs, ORT outputs) per batch
    tally, per_layer = _Tally(), {}
    identical = True
    for n, batch in enumerate(batches):
        inputs = as_inputs(batch)
        check_finite(inputs, f"verify batch {n}")
        feed = {k: t.cpu().numpy() for k, t in zip(names, inputs)}
        ort_out = [torch.from_numpy(o) for o in plain.run(None, feed)]
        free.append((_as_list(model(*inputs)), ort_out))
        if quantized:
            results = tapped.run(None, feed)
            forcer = _Forcer(results[n_out:n_out + n_taps], tally, per_layer)
            state = quantization_state(model)
            state.tap = forcer
            try:
                out = _as_list(model(*inputs))
            finally:
                state.tap = None
            if forcer.k != n_taps:
                raise QatkitError(f"verify: PyTorch applied {forcer.k} activation quantizers, the ONNX graph has "
                                  f"{n_taps}; export the model again from this checkpoint")
            forced.append((out, [torch.from_numpy(o) for o in results[:n_out]]))
            identical &= all(torch.equal(a, b) for a, b in zip(forced[-1][1], ort_out))
    if not free:
        raise DataError("verify got no batches: pass a non-empty iterable of inputs")
    steps = _output_steps(model, [t for t, _ in free])
    free_tally, out_tally = _Tally(), _Tally()
    for pairs, t in ((free, free_tally), (forced or free, out_tally)):
        for ref, got in pairs:
            for i, (r, g) in enumerate(zip(ref, got)):
                t.add((r - g).abs() / steps[i])
    if not quantized:
        tally = out_tally
    elif any(k is None for k in quantization_state(model).outputs):  # float outputs are not among the taps
        tally.within, tally.total = tally.within + out_tally.within, tally.total + out_tally.total
    worst = sorted(((k, 1 - v.share) for k, v in per_layer.items() if v.share < 1), key=lambda kv: -kv[1])[:5]
    return VerifyReport(tally.share, out_tally.share, free_tally.share, max(tally.max_steps, out_tally.max_steps),
                        free_tally.max_steps, tally.total, len(free), steps, worst, identical)
