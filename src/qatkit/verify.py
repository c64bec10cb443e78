"""Verify: run the exported ONNX model in an inference runtime (ONNX Runtime, OpenVINO, or a Rockchip NPU in
rknn-toolkit2's simulator: :mod:`qatkit.targets`) and compare it with the PyTorch model it came from.

Two comparisons, because a deep quantized network is chaotic with respect to rounding: one value that lands on the
other side of a rounding boundary (float summation order differs between any two libraries) shifts its
consumers by a fraction of a step, which flips some of *their* roundings, and so on. Measured on the demo detector
even with ORT's optimisations off, free-running outputs agree within one step for only ~90 % of values, while mAP
agrees to 0.001. So:

* **layer-wise (teacher-forced)**: the runtime runs once with every activation QuantizeLinear output exposed as a
  graph output (every runtime returns those as integer codes); PyTorch then runs with each quantizer's result
  replaced by the runtime's value for that tensor (same execution order as the ONNX graph), and each tensor is
  compared in integer codes. This checks that every layer in the runtime computes what PyTorch computes from the
  same inputs. ``within_one_step`` is the share of all quantized values (every layer, model outputs included)
  within one step; ``outputs_within_one_step`` the share for the model outputs.
* **free-running**: plain runs both ways (``free_running_within_one_step``) and, with a ``metric``, the metric both
  ways (``torch_map`` / ``onnx_map``).
The step of a float model output (e.g. TensorRT's float output convs) is one 8-bit step of its range.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .calibrate import check_finite
from .capture import tensors_of
from .errors import DataError, QatkitError
from .quant.quantizer import FakeQuantizer
from .quantize import as_inputs, quantization_state
from .export.graph import constant_values
from .runtime.layer_cache import kept_layers
from .targets import Predictor, Runtime, open_runtime

STEP_TOLERANCE = 1e-4  # relative slack on "one step" for float rounding in the comparison itself
Metric = Callable[[Predictor], float]


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
    tapped_outputs_identical: bool = True  # exposing intermediates did not change the runtime's model outputs
    torch_map: float | None = None  # the metric of the PyTorch model (mAP with the detector evaluator)
    onnx_map: float | None = None  # the metric of the ONNX model in the runtime
    runtime: str = "onnxruntime"
    precision: str = "f32"
    reasons: dict[str, str] = field(default_factory=dict)  # worst layer -> what its disagreement points to

    def as_dict(self) -> dict:
        return asdict(self)


class _Tally:
    def __init__(self) -> None:
        self.within = self.total = self.at_edge = 0
        self.max_steps = 0.0

    def add(self, diff_steps: torch.Tensor, at_edge: int = 0) -> None:
        self.within += int((diff_steps <= 1 + STEP_TOLERANCE).sum())
        self.total += diff_steps.numel()
        self.at_edge += at_edge
        self.max_steps = max(self.max_steps, float(diff_steps.max()) if diff_steps.numel() else 0.0)

    def merge(self, other: _Tally) -> None:
        self.within, self.total = self.within + other.within, self.total + other.total
        self.max_steps = max(self.max_steps, other.max_steps)

    @property
    def share(self) -> float:
        return self.within / max(self.total, 1)


def _activation_quantizers(model: onnx.ModelProto) -> list[tuple[str, np.ndarray]]:
    """(output, zero point) of each QuantizeLinear on an activation (weights are integer constants, not quantized
    in-graph). The zero point is read from the graph: an export with ``unsigned_activations`` shifts it."""
    const = constant_values(model.graph)
    return [(n.output[0], const[n.input[2]].reshape(-1)[:1] if len(n.input) > 2 else np.zeros(1, np.uint8))
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in const]


def _tapped_copy(onnx_path: Path, folder: Path) -> tuple[Path, list[tuple[str, int]], bool]:
    """The model with every activation QuantizeLinear output added as a graph output; (name, zero point) of those
    outputs; whether any of them is on a signed container."""
    model = onnx.load(str(onnx_path))
    taps = _activation_quantizers(model)
    existing = {o.name for o in model.graph.output}
    for name, _ in taps:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    path = folder / "tapped.onnx"
    onnx.save(model, str(path))
    signed = any(np.issubdtype(zp.dtype, np.signedinteger) for _, zp in taps)
    return path, [(name, int(zp[0])) for name, zp in taps], signed


class _Forcer:
    """Replaces the k-th activation quantizer result with the runtime's k-th tensor and tallies the code
    differences."""

    def __init__(self, codes: list[np.ndarray], zero_points: list[int], tally: _Tally,
                 per_layer: dict[str, _Tally]) -> None:
        self.codes, self.zero_points, self.tally, self.per_layer, self.k = codes, zero_points, tally, per_layer, 0

    def __call__(self, q: FakeQuantizer, y: torch.Tensor) -> torch.Tensor:
        if self.k >= len(self.codes):
            raise QatkitError("verify: PyTorch applied more quantizers than the ONNX graph holds; re-export the model")
        codes = self.codes[self.k]
        if not np.issubdtype(codes.dtype, np.integer):
            raise QatkitError(f"verify: the runtime returned {codes.dtype} for QuantizeLinear output {self.k} "
                              f"({q.name}), not integer codes; it cannot be compared in steps")
        scale, zp = q.scale.detach().float(), q.zero_point.detach().float()
        # the graph's codes on the quantizer's own grid (they differ by a constant when exported unsigned)
        got = torch.from_numpy(codes.astype(np.float32)) - (self.zero_points[self.k] - zp)
        self.k += 1
        if got.shape != y.shape or scale.numel() != 1:
            raise QatkitError(f"verify: tensor {self.k - 1} ({q.name}) does not line up with the ONNX graph")
        diff = (torch.round(y.detach() / scale) + zp - got).abs()
        beyond = diff > 1 + STEP_TOLERANCE
        at_edge = int((beyond & ((got == q.scheme.qmin) | (got == q.scheme.qmax))).sum())
        self.tally.add(diff)
        self.per_layer.setdefault(q.name, _Tally()).add(diff, at_edge)
        return ((got - zp) * scale).to(y.dtype)


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


def _torch_predictor(model: nn.Module) -> Predictor:
    def predict(images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _as_list(model(images))

    return predict


@torch.no_grad()
def verify(model: nn.Module, onnx_path: str | Path, batches: Iterable, *, runtime: str = "onnxruntime",
           metric: Metric | None = None, threads: int | None = None, precision: str = "f32",
           runtime_options: dict | None = None) -> VerifyReport:
    """Compare ``model`` (PyTorch) with its export ``onnx_path`` run in ``runtime``, layer by layer and end to end.

    Args:
        model: the quantized (or float) PyTorch model the ONNX file was exported from; left in its train/eval mode.
        onnx_path: the exported ONNX file.
        batches: inputs to compare on: tensors, or tuples/dicts of them, as ``quantize``'s example inputs.
        runtime: ``"onnxruntime"``, ``"openvino"`` or ``"rknn"`` (see :mod:`qatkit.targets`).
        metric: ``metric(predict) -> float`` with ``predict: images -> list of output tensors``; evaluated on the
            PyTorch model (``torch_map``) and on the runtime (``onnx_map``).
        threads: the runtime's threads (``None``: its default).
        precision: float precision of the runtime's non-integer parts; ``"f32"`` unless you want to measure e.g.
            OpenVINO's ``"bf16"``.
        runtime_options: the runtime's own settings, e.g. ``{"platform": "rk3566"}`` for rknn.

    Returns:
        A :class:`VerifyReport`; ``worst_layers`` names the quantizers (or float outputs) with values beyond one step,
        ``reasons`` what each disagreement points to where that can be told.

    Raises:
        QatkitError: unknown runtime or precision, or the ONNX graph does not line up with the model (re-export).
        DataError: ``batches`` is empty or holds non-finite values.

    Example:
        >>> report = qatkit.verify(qm, "model.qdq.onnx", batches, runtime="openvino",
        ...                        metric=lambda predict: my_accuracy(predict, val_set))
        >>> assert report.within_one_step >= 0.999, report.worst_layers
    """
    was_training = model.training
    model.eval()
    try:
        options = dict(runtime_options or {})
        plain = open_runtime(onnx_path, runtime, threads=threads, precision=precision, **options)
        tapped, taps, signed = plain, [], False
        if hasattr(model, "_qatkit"):
            with tempfile.TemporaryDirectory() as tmp:  # both runtimes hold the model in memory once compiled
                tapped_path, taps, signed = _tapped_copy(Path(onnx_path), Path(tmp))
                tapped = open_runtime(tapped_path, runtime, threads=threads, precision=precision, **options)
        with kept_layers(model):  # weights do not change here: each layer's is quantized once
            report = _verify(model, plain, tapped, taps, batches, signed)
            if metric is not None:
                report.onnx_map = float(metric(plain.predictor()))
                report.torch_map = float(metric(_torch_predictor(model)))
        return report
    finally:
        model.train(was_training)


def _verify(model: nn.Module, plain: Runtime, tapped: Runtime, taps: list[tuple[str, int]],
            batches: Iterable, signed: bool) -> VerifyReport:
    quantized = hasattr(model, "_qatkit")
    names, n_out = plain.input_names, plain.n_outputs
    where = {name: i for i, name in enumerate(tapped.output_names)}
    free, forced = [], []  # (torch outputs, runtime outputs) per batch
    tally, per_layer = _Tally(), {}
    identical = True
    for n, batch in enumerate(batches):
        inputs = as_inputs(batch)
        check_finite(inputs, f"verify batch {n}")
        feed = {k: t.cpu().numpy() for k, t in zip(names, inputs)}
        rt_out = [torch.from_numpy(o) for o in plain.run(feed)]
        free.append((_as_list(model(*inputs)), rt_out))
        if quantized:
            results = tapped.run(feed)
            forcer = _Forcer([results[where[t]] for t, _ in taps], [z for _, z in taps], tally, per_layer)
            state = quantization_state(model)
            state.tap = forcer
            try:
                out = _as_list(model(*inputs))
            finally:
                state.tap = None
            if forcer.k != len(taps):
                raise QatkitError(f"verify: PyTorch applied {forcer.k} activation quantizers, the ONNX graph has "
                                  f"{len(taps)}; export the model again from this checkpoint")
            forced.append((out, [torch.from_numpy(o) for o in results[:n_out]]))
            identical &= all(torch.equal(a, b) for a, b in zip(forced[-1][1], rt_out))
    if not free:
        raise DataError("verify got no batches: pass a non-empty iterable of inputs")
    steps = _output_steps(model, [t for t, _ in free])
    keys = quantization_state(model).outputs if quantized else []
    float_outputs = [i for i in range(len(steps)) if i >= len(keys) or keys[i] is None]
    free_tally, out_tally = _Tally(), _Tally()
    for pairs, t in ((free, free_tally), (forced or free, out_tally)):
        for ref, got in pairs:
            for i, (r, g) in enumerate(zip(ref, got)):
                diff = (r - g).abs() / steps[i]
                t.add(diff)
                if t is out_tally and quantized and i in float_outputs:  # float outputs are not among the taps
                    per_layer.setdefault(f"output {plain.output_names[i]}", _Tally()).add(diff)
    if not quantized:
        tally = out_tally
    elif float_outputs:
        tally.merge(out_tally)
    worst = sorted(((k, 1 - v.share) for k, v in per_layer.items() if v.share < 1), key=lambda kv: -kv[1])[:5]
    return VerifyReport(tally.share, out_tally.share, free_tally.share, max(tally.max_steps, out_tally.max_steps),
                        free_tally.max_steps, tally.total, len(free), steps, worst, identical,
                        runtime=plain.name, precision=plain.precision,
                        reasons={k: _reason(per_layer[k], plain, signed) for k, _ in worst})


def _reason(t: _Tally, rt: Runtime, signed: bool) -> str:
    """What a layer's disagreement beyond one step points to, from what the comparison itself saw."""
    if rt.name == "openvino" and signed and rt.precision == "f32":
        return ("OpenVINO miscomputes some signed-int8 activation graphs (CSP concats, docs/openvino.md): export the "
                "file for OpenVINO with unsigned_activations=True (qatkit export --unsigned-activations)")
    if rt.name == "rknn":
        return (f"up to {t.max_steps:.0f} steps: rknn-toolkit2's simulator does not compute integer arithmetic "
                "exactly (one code off on a sixth of a conv's values where ORT is exact, docs/targets.md); judge the "
                "compiled model by the metric both ways")
    if rt.precision != "f32":
        return (f"{rt.name} ran the float parts at {rt.precision} (8 or 11 mantissa bits): verify with "
                "precision='f32' to check the integer kernels")
    beyond = t.total - t.within
    if beyond and t.at_edge * 2 > beyond:
        return ("the runtime clips most of these values at the grid edge where PyTorch does not: the exported "
                "scale/zero-point or Clip differs from the quantizer's; re-export and compare with `qatkit inspect`")
    return (f"up to {t.max_steps:.0f} steps: {rt.name} computes the ops before this tensor differently from PyTorch "
            "(its own fusion or approximation)")
