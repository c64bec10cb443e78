"""``qatkit inspect``: every quantizer of a model (or Q/DQ pair of an ONNX file) and a lint of the placement.

The lint counts the placement mistakes seed 001 checks by hand and seed 003 fixes by hand: compute layers whose
input is not quantized, concat inputs on different scales (TensorRT then inserts reformat layers), max-pool input
and output on different scales, QuantizeLinear without DequantizeLinear, quantizers left uncalibrated, and scales
a compiler rejects (not positive, or below the floor of :mod:`qatkit.quant.qparams`).

It also lists the quantizers whose range *collapsed* (dead channels, constant tensors) and what qatkit did about
it: handled, so reported apart, not as problems. A checkpoint holds each quantizer's range, so every collapse is
listed. An ONNX file holds only scales and codes: there a weight channel whose codes are all the zero point is dead,
and a scale exactly at the floor for some bit-width (``MIN_RANGE / steps``) was floored; an activation that was
constant zero (scale 1.0) cannot be told from a legitimate scale of 1.0, so only the checkpoint side lists it.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from ..export.graph import constant_values
from ..plan import slot
from ..quant.qparams import MIN_RANGE, collapsed, scale_floor
from ..quantize import quantization_state

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# op types that move values without changing them: a tensor and these ops' outputs carry one scale
PASSTHROUGH_OPS = ("MaxPool", "Resize", "Reshape", "Flatten", "Slice", "Split", "Squeeze", "Unsqueeze", "Transpose",
                   "Identity", "Gather")
KEPT_FLOAT = "conv/linear kept float by the recipe"  # reported, not a problem
COLLAPSED = "quantizers with collapsed ranges (handled, listed below)"  # reported, not a problem
INFO = (KEPT_FLOAT, COLLAPSED)
# every grid a scale can sit at the floor of: 2..16 bits, full or narrow range (qmax - qmin = 2^b - 1 or 2^b - 2)
_GRID_STEPS = np.array([2**b - d for b in range(2, 17) for d in (1, 2)], dtype=np.float64)


@dataclass
class Row:
    name: str
    scheme: str
    scale: str
    zero_point: str
    uses: int
    state: str
    collapsed: str = ""  # what happened to dead channels / a constant tensor ("" when nothing collapsed)


def _fmt(values: np.ndarray) -> str:
    values = np.asarray(values).reshape(-1)
    if values.size == 1:
        return f"{float(values[0]):.6g}"
    return f"[{float(values.min()):.3g} .. {float(values.max()):.3g}] x{values.size}"


def _describe(zero: int, floored: int, total: int, floor: float, dead_word: str = "zero range",
              dead_scale: str = "1.0") -> str:
    """``3 of 64 channels had zero range: scale 1.0`` (or the per-tensor wording); "" when nothing collapsed."""
    parts = []
    if total == 1:
        if zero:
            parts.append(f"constant tensor ({dead_word}): scale {dead_scale}")
        if floored:
            parts.append(f"range below {MIN_RANGE:g}: scale set to the floor {floor:.3g}")
        return "; ".join(parts)
    if zero:
        parts.append(f"{zero} of {total} channels had {dead_word}: scale {dead_scale}")
    if floored:
        parts.append(f"{floored} of {total} channels had a range below {MIN_RANGE:g}: scale set to the floor "
                     f"{floor:.3g}")
    return "; ".join(parts)


def collapse_note(q) -> str:
    """What collapsed in one calibrated :class:`FakeQuantizer` and the scale it got ("" when nothing did).

    Args:
        q: a quantizer of a quantized model (its ``range_lo``/``range_hi`` hold the range behind its scale).

    Example:
        >>> import torch
        >>> from qatkit import FakeQuantizer, QuantScheme
        >>> q = FakeQuantizer(QuantScheme(per_channel=True), "w", channels=2, dynamic=True)
        >>> _ = q(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
        >>> collapse_note(q)
        '1 of 2 channels had zero range: scale 1.0'
    """
    if not q.is_calibrated:
        return ""
    s = q.scheme
    zero, floored = collapsed(q.range_lo, q.range_hi, s.qmin, s.qmax, s.symmetric)
    note = _describe(int(zero.sum()), int(floored.sum()), zero.numel(), scale_floor(s.qmin, s.qmax))
    if q.dynamic and bool(zero.all()):  # a weight quantizer's range is set by the layer's first forward
        note += " (a dead layer, or the model has not run since quantize)"
    return note


def model_rows(model: nn.Module) -> list[Row]:
    state = quantization_state(model)
    uses = Counter()
    for site in state.sites.values():
        for key in (*site.inputs.values(), site.output, site.weight, site.sigmoid):
            if key is not None:
                uses[slot(key)] += 1
    rows = []
    for key, q in state.quantizers.items():
        flags = "fixed range" if q.fixed_range else "calibrated" if q.is_calibrated else "NOT CALIBRATED"
        flags += "" if bool(q.fake_quant_enabled) else ", fake-quant off"
        rows.append(Row(q.name, q.scheme.describe(), _fmt(q.scale.detach().numpy()), _fmt(q.zero_point.numpy()),
                        uses[key], flags, collapse_note(q)))
    return rows


def lint_model(model: nn.Module) -> dict[str, int]:
    state = quantization_state(model)
    recipe = state.recipe
    counts = Counter()
    counts["uncalibrated quantizers"] = sum(not q.is_calibrated for q in state.quantizers.values())
    for key, site in state.sites.items():
        if site.weight is not None and not site.inputs and site.bias_from is None:
            counts["conv/linear inputs not quantized"] += 1
    counts["output quantizers where the recipe keeps outputs float"] = (
        sum(k is not None for k in state.outputs) if recipe.get("keep_output_convs_float") else 0)
    counts[KEPT_FLOAT] = len(state.float_layers)
    counts[COLLAPSED] = sum(bool(collapse_note(q)) for q in state.quantizers.values())
    return {k: v for k, v in counts.items() if v}


# ------------------------------------------------------------------ ONNX files
class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.const = constant_values(g)

    def node_qparams(self, node) -> tuple | None:
        """(scale, zero point) of a Q or DQ node as comparable bytes; None if not constant."""
        scale = self.const.get(node.input[1])
        zp = self.const.get(node.input[2]) if len(node.input) > 2 else None
        return None if scale is None else (scale.tobytes(), None if zp is None else zp.tobytes())

    def qparams(self, dq_output: str) -> tuple | None:
        """Quantization parameters of the DequantizeLinear producing ``dq_output`` (None: not a DQ output)."""
        n = self.producer.get(dq_output)
        return self.node_qparams(n) if n is not None and n.op_type == "DequantizeLinear" else None


def _dequantize_nodes(g: _Graph):
    """(node, kind, scale, zero point, integer codes or None) of every DequantizeLinear with a constant scale."""
    for n in g.nodes:
        if n.op_type != "DequantizeLinear" or n.input[1] not in g.const:
            continue
        src = g.producer.get(n.input[0])
        kind = "activation" if src is not None and src.op_type == "QuantizeLinear" else "constant"
        zp = g.const.get(n.input[2]) if len(n.input) > 2 else None
        yield n, kind, np.asarray(g.const[n.input[1]], dtype=np.float64), zp, g.const.get(n.input[0])


def _dead(node, channels: int, zp: np.ndarray | None, codes: np.ndarray) -> np.ndarray:
    """Per channel of a constant (weight) DequantizeLinear: are all its codes the zero point?"""
    zero = np.zeros(channels, np.int64) if zp is None else np.asarray(zp, np.int64).reshape(-1)
    codes = codes.astype(np.int64)
    if channels == 1:
        return np.array([bool((codes == zero[0]).all())])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1
    return (np.moveaxis(codes, axis % codes.ndim, 0).reshape(channels, -1) == zero[:, None]).all(axis=1)


def _onnx_collapse(node, kind: str, scale: np.ndarray, zp: np.ndarray | None, codes: np.ndarray | None) -> str:
    """Dead weight channels (all codes at the zero point) and scales exactly at a floor, described."""
    flat = scale.reshape(-1)
    floored = np.isclose(flat[:, None] * _GRID_STEPS, MIN_RANGE, rtol=1e-5, atol=0.0).any(axis=1)
    dead = np.zeros_like(floored)
    if kind == "constant" and codes is not None and codes.dtype != np.int32:  # int32 constants are biases
        dead = _dead(node, flat.size, zp, codes)
    floor = float(flat[floored].min()) if floored.any() else 0.0
    dead_scales = np.unique(flat[dead])
    dead_scale = ("1.0" if dead_scales.tolist() in ([], [1.0])
                  else " .. ".join(f"{v:.3g}" for v in sorted({dead_scales[0], dead_scales[-1]})))
    return _describe(int(dead.sum()), int((floored & ~dead).sum()), flat.size, floor, "all codes zero", dead_scale)


def onnx_rows(path: str | Path) -> list[Row]:
    g = _Graph(onnx.load(str(path)))
    return [Row(n.output[0], kind, _fmt(scale), _fmt(np.zeros(1) if zp is None else zp),
                len(g.consumers.get(n.output[0], [])), "", _onnx_collapse(n, kind, scale, zp, codes))
            for n, kind, scale, zp, codes in _dequantize_nodes(g)]


def _scale_problems(g: _Graph) -> Counter:
    """Scales a compiler rejects: not positive and finite, or covering less than MIN_RANGE on their container."""
    counts = Counter()
    for _, kind, scale, zp, codes in _dequantize_nodes(g):
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            counts["scales not positive and finite"] += 1
            continue
        container = zp if zp is not None else codes
        if container is None or container.dtype == np.int32:  # int32 biases are on s_in * s_w by definition
            continue
        steps = float(np.iinfo(container.dtype).max) - float(np.iinfo(container.dtype).min)
        if (scale * steps < MIN_RANGE * (1 - 1e-6)).any():
            counts[f"scales below the floor (scale x grid < {MIN_RANGE:g})"] += 1
    return counts


def _scales(g: _Graph, tensor: str) -> set:
    """Quantization parameters a tensor carries: its DQ producer's and its Q consumers', through passthrough ops.

    This is what TensorRT sees after moving Q/DQ across max-pool/resize/reshape: two different sets meeting at a
    concat mean a reformat layer.
    """
    found, todo, seen = set(), [tensor], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        prod = g.producer.get(t)
        if prod is not None and prod.op_type == "DequantizeLinear":
            found.add(g.node_qparams(prod))
        elif prod is not None and prod.op_type in PASSTHROUGH_OPS:
            todo.append(prod.input[0])
        for c in g.consumers.get(t, []):
            if c.op_type == "QuantizeLinear":
                found.add(g.node_qparams(c))
            elif c.op_type in PASSTHROUGH_OPS and c.input[0] == t:
                todo.extend(c.output)
    return found - {None}


def lint_onnx(path: str | Path) -> dict[str, int]:
    model = onnx.load(str(path))
    g = _Graph(model)
    meta = {p.key: p.value for p in model.metadata_props}
    kept_float = len(json.loads(meta.get("qatkit.float_layers", "[]")))
    counts = _scale_problems(g)
    counts[COLLAPSED] = sum(bool(_onnx_collapse(*entry)) for entry in _dequantize_nodes(g))
    for n in g.nodes:
        if n.op_type in COMPUTE_OPS and g.qparams(n.input[0]) is None:
            counts["conv/linear inputs not quantized"] += 1
        elif n.op_type == "Concat":
            # a concat whose output stays float (e.g. in a float head decode) just reads dequantized inputs
            out = _scales(g, n.output[0])
            scales = out.union(*(_scales(g, t) for t in n.input))
            if out and len(scales) > 1:
                counts["concat inputs with different scales"] += 1
        elif n.op_type == "MaxPool":
            out = [c for c in g.consumers.get(n.output[0], []) if c.op_type == "QuantizeLinear"]
            src = g.qparams(n.input[0])
            if src is not None and out and any(g.node_qparams(q) != src for q in out):
                counts["max-pool input/output on different scales"] += 1
        elif n.op_type == "QuantizeLinear":
            if not any(c.op_type == "DequantizeLinear" for c in g.consumers.get(n.output[0], [])):
                counts["QuantizeLinear without DequantizeLinear"] += 1
    # layers the exporting recipe keeps float (export metadata) are reported apart, not as problems
    float_inputs = counts.pop("conv/linear inputs not quantized", 0)
    counts[KEPT_FLOAT] = min(float_inputs, kept_float)
    counts["conv/linear inputs not quantized"] = float_inputs - counts[KEPT_FLOAT]
    return {k: v for k, v in counts.items() if v}


def format_report(rows: list[Row], lint: dict[str, int]) -> str:
    head = ("name", "scheme", "scale", "zero point", "sites sharing it", "state")
    table = [head] + [(r.name, r.scheme, r.scale, r.zero_point, str(r.uses), r.state) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.append("")
    lines.append("lint: " + (", ".join(f"{k}: {v}" for k, v in sorted(lint.items())) or "nothing to report"))
    notes = [f"  {r.name}: {r.collapsed}" for r in rows if r.collapsed]
    if notes:
        lines += ["", "collapsed ranges (dead channels, constant tensors; the scale qatkit chose):"] + notes
    return "\n".join(lines)


def problems(lint: dict[str, int]) -> int:
    """The lint findings that are problems (``--strict`` fails on them); INFO entries are reported only."""
    return sum(v for k, v in lint.items() if k not in INFO)
