"""Verify: run the exported ONNX model in ONNX Runtime and compare it with the PyTorch model it came from.

The agreement figure is the share of output values whose ORT and PyTorch results differ by at most one
quantization step. The step of an output is its quantizer's scale when the recipe quantizes it; for a float
output (e.g. TensorRT's float output convs) it is one 8-bit step of that output's range over the batches.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .calibrate import check_finite
from .errors import DataError
from .onnx_runtime import predictor, session
from .quantize import _as_tuple, quantization_state

STEP_TOLERANCE = 1e-4  # relative slack on "one step" for float rounding in the comparison itself


@dataclass
class VerifyReport:
    within_one_step: float
    max_steps: float
    max_abs_diff: float
    values: int
    batches: int
    steps: list[float]
    torch_map: float | None = None
    onnx_map: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _output_steps(model: nn.Module, ranges: list[tuple[float, float]]) -> list[float]:
    keys = quantization_state(model).outputs if hasattr(model, "_qatkit") else []
    steps = []
    for i, (lo, hi) in enumerate(ranges):
        key = keys[i] if i < len(keys) else None
        if key is not None:
            steps.append(float(quantization_state(model).q(key).scale.max()))
        else:
            steps.append(max(hi - lo, 1e-12) / 255.0)
    return steps


@torch.no_grad()
def verify(model: nn.Module, onnx_path: str | Path, batches: Iterable, *, dataset=None,
           threads: int | None = None) -> VerifyReport:
    """Compare ``model`` (PyTorch) and ``onnx_path`` (ORT) on ``batches``; with ``dataset``, also mAP both ways."""
    sess = session(onnx_path, threads)
    names = [i.name for i in sess.get_inputs()]
    was_training = model.training
    model.eval()
    try:
        return _verify(model, sess, names, batches, dataset)
    finally:
        model.train(was_training)


def _verify(model: nn.Module, sess, names: list[str], batches: Iterable, dataset) -> VerifyReport:
    pairs = []
    for n, batch in enumerate(batches):
        inputs = _as_tuple(batch)
        check_finite(inputs, f"verify batch {n}")
        ref = model(*inputs)
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(None, {k: t.cpu().numpy() for k, t in zip(names, inputs)})
        pairs.append(([r.float() for r in ref], [torch.from_numpy(g) for g in got]))
    if not pairs:
        raise DataError("verify got no batches: pass a non-empty iterable of inputs")
    n_out = len(pairs[0][0])
    ranges = [(min(float(p[0][i].min()) for p in pairs), max(float(p[0][i].max()) for p in pairs))
              for i in range(n_out)]
    steps = _output_steps(model, ranges)
    within = total = 0
    max_steps = max_abs = 0.0
    for ref, got in pairs:
        for i, (r, g) in enumerate(zip(ref, got)):
            diff = (r - g).abs()
            within += int((diff <= steps[i] * (1 + STEP_TOLERANCE)).sum())
            total += diff.numel()
            max_abs = max(max_abs, float(diff.max()))
            max_steps = max(max_steps, float(diff.max()) / steps[i])
    report = VerifyReport(within / total, max_steps, max_abs, total, len(pairs), steps)
    if dataset is not None:
        from .eval.detect import evaluate, torch_predictor

        report.onnx_map = evaluate(predictor(sess), dataset)["map"]
        report.torch_map = evaluate(torch_predictor(model), dataset)["map"]
    return report
