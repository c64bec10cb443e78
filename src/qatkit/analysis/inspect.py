"""``qatkit inspect``: every quantizer of a model (or Q/DQ pair of an ONNX file) and a lint of the placement.

The lint counts the placement mistakes seed 001 checks by hand and seed 003 fixes by hand: compute layers whose
input is not quantized, concat inputs on different scales (TensorRT then inserts reformat layers), max-pool input
and output on different scales, QuantizeLinear without DequantizeLinear, quantizers left uncalibrated.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from ..quantize import quantization_state

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# op types that move values without changing them: a tensor and these ops' outputs carry one scale
PASSTHROUGH_OPS = ("MaxPool", "Resize", "Reshape", "Flatten", "Slice", "Split", "Squeeze", "Unsqueeze", "Transpose",
                   "Identity", "Gather")
KEPT_FLOAT = "conv/linear kept float by the recipe"  # reported, not a problem


@dataclass
class Row:
    name: str
    scheme: str
    scale: str
    zero_point: str
    uses: int
    state: str


def _fmt(values: np.ndarray) -> str:
    values = np.asarray(values).reshape(-1)
    if values.size == 1:
        return f"{float(values[0]):.6g}"
    return f"[{float(values.min()):.3g} .. {float(values.max()):.3g}] x{values.size}"


def model_rows(model: nn.Module) -> list[Row]:
    state = quantization_state(model)
    uses = Counter()
    for site in state.sites.values():
        for key in (*site.inputs.values(), site.output, site.weight, site.sigmoid):
            if key is not None:
                uses[key.replace(".", ":")] += 1
    rows = []
    for key, q in state.quantizers.items():
        flags = ("calibrated" if q.is_calibrated else "NOT CALIBRATED") + ("" if bool(q.fake_quant_enabled)
                                                                          else ", fake-quant off")
        rows.append(Row(q.name, q.scheme.describe(), _fmt(q.scale.detach().numpy()), _fmt(q.zero_point.numpy()),
                        uses[key], flags))
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
        self.const = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def node_qparams(self, node) -> tuple | None:
        """(scale, zero point) of a Q or DQ node as comparable bytes; None if not constant."""
        scale = self.const.get(node.input[1])
        zp = self.const.get(node.input[2]) if len(node.input) > 2 else None
        return None if scale is None else (scale.tobytes(), None if zp is None else zp.tobytes())

    def qparams(self, dq_output: str) -> tuple | None:
        """Quantization parameters of the DequantizeLinear producing ``dq_output`` (None: not a DQ output)."""
        n = self.producer.get(dq_output)
        return self.node_qparams(n) if n is not None and n.op_type == "DequantizeLinear" else None


def onnx_rows(path: str | Path) -> list[Row]:
    g = _Graph(onnx.load(str(path)))
    rows = []
    for n in g.nodes:
        if n.op_type != "DequantizeLinear" or n.input[1] not in g.const:
            continue
        src = g.producer.get(n.input[0])
        kind = "activation" if src is not None and src.op_type == "QuantizeLinear" else "constant"
        zp = g.const.get(n.input[2]) if len(n.input) > 2 else np.zeros(1)
        rows.append(Row(n.output[0], kind, _fmt(g.const[n.input[1]]), _fmt(zp),
                        len(g.consumers.get(n.output[0], [])), ""))
    return rows


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
    counts = Counter()
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
    return "\n".join(lines)


def problems(lint: dict[str, int]) -> int:
    return sum(v for k, v in lint.items() if k != KEPT_FLOAT)
