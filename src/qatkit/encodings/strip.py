"""QDQ ONNX -> float ONNX + encodings: every Q/DQ leaves the graph and its grid goes into the encodings.

* An activation ``x -> [Clip] -> QuantizeLinear -> DequantizeLinear`` is removed; the readers of the
  DequantizeLinear read ``x``, and ``x`` gets the encoding. The Clip that qatkit's export puts before a grid
  narrower than its container (``FakeQuantizer._export_clip``) is recognised by its bounds, which are the grid's
  ends, and removed too: the encoding implies it and the rebuild re-creates it.
* A DequantizeLinear of an integer constant (weights, int32 biases) becomes a float initializer holding exactly
  what DequantizeLinear computes, named as the DequantizeLinear output (so no reader changes), with one encoding
  per channel. Biases are recorded as 32-bit encodings with their scale ``s_input * s_weight``.
* Where the encoding cannot sit on ``x`` itself -- another reader uses ``x`` unquantized, ``x`` already carries a
  different grid, or ``x`` is a graph output -- an ``Identity`` gives the quantized copy its own name (the
  DequantizeLinear's output) and the encoding goes on that name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analysis.inspect import _Graph
from ..errors import QatkitError
from .grid import BIAS_BITS, CONTAINERS, ENCODINGS_VERSION, Grid, code_bits


@dataclass
class _Pair:
    """One activation quantizer application: ``src -> [clip] -> q -> dqs``."""

    src: str
    nodes: list  # the clip (if any), the QuantizeLinear and its DequantizeLinear nodes
    outputs: list[str]  # the DequantizeLinear outputs
    grid: Grid


def _attr(node, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _qparams(g: _Graph, node) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """Scale (float32), zero point (int64) and container type of a Q or DQ node; the type comes from the zero point
    (ONNX's default is uint8 without one; a DequantizeLinear of int32 has none)."""
    if node.input[1] not in g.const or (len(node.input) > 2 and node.input[2] and node.input[2] not in g.const):
        raise QatkitError(f"{node.op_type} {node.name!r} has a computed scale or zero point: encodings hold constant "
                          "grids only (export with qatkit.export_onnx, which writes them as constants)")
    scale = g.const[node.input[1]].astype(np.float32)
    if len(node.input) > 2 and node.input[2]:
        zp = g.const[node.input[2]]
        return scale, zp.astype(np.int64), zp.dtype
    data = g.const.get(node.input[0])
    dtype = data.dtype if data is not None else np.dtype(np.uint8)
    return scale, np.zeros(scale.shape, np.int64), dtype


def _dequantized(g: _Graph, dq) -> tuple[np.ndarray, list[Grid]]:
    """A DequantizeLinear of a constant: its float32 result (as ONNX Runtime computes it) and one grid per channel."""
    codes = g.const[dq.input[0]].astype(np.int64)
    scale, zp, dtype = _qparams(g, dq)
    if dtype not in CONTAINERS:
        raise QatkitError(f"DequantizeLinear {dq.name!r} reads {dtype} values: only int8/uint8/int16/uint16/int32 "
                          "constants become float initializers")
    shape = [1] * codes.ndim
    if scale.ndim:
        shape[_attr(dq, "axis", 1) % codes.ndim] = -1
    values = (codes - zp.reshape(shape)).astype(np.float32) * scale.reshape(shape)
    signed = CONTAINERS[dtype][0] < 0
    if dtype == np.int32:
        qmin, qmax = CONTAINERS[dtype]
    else:
        bits = code_bits(codes, signed) if (codes != zp.reshape(shape)).any() else dtype.itemsize * 8
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    grids = [Grid.from_qdq(s, z, qmin, qmax, signed) for s, z in zip(scale.reshape(-1), zp.reshape(-1))]
    if dtype == np.int32:
        grids = [Grid(gr.scale, gr.lo, gr.hi, BIAS_BITS, gr.symmetric) for gr in grids]
    return values.astype(np.float32), grids


def _narrow_clip(g: _Graph, q, scale: float, zp: int, dtype: np.dtype) -> tuple | None:
    """(clip node, qmin, qmax) when ``q`` reads a Clip whose bounds are ends of a grid narrower than its container."""
    clip = g.producer.get(q.input[0])
    if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or len(g.consumers.get(clip.output[0], [])) != 1:
        return None
    bounds = [g.const.get(name) for name in clip.input[1:3]]
    if any(b is None for b in bounds):
        return None
    steps = [float(b) / scale for b in bounds]
    qmin, qmax = (round(s) + zp for s in steps)
    lo_c, hi_c = CONTAINERS[dtype]
    on_grid = all(abs(s - round(s)) < 1e-3 for s in steps) and lo_c <= qmin < qmax <= hi_c
    return (clip, qmin, qmax) if on_grid and (qmin, qmax) != (lo_c, hi_c) else None


def _pair(g: _Graph, q) -> _Pair:
    dqs = g.consumers.get(q.output[0], [])
    if not dqs or any(n.op_type != "DequantizeLinear" for n in dqs):
        raise QatkitError(f"QuantizeLinear {q.name!r} feeds {[n.op_type for n in dqs]}, not only DequantizeLinear: "
                          "encodings describe QuantizeLinear -> DequantizeLinear pairs (export with qatkit.export_onnx)")
    scale, zp, dtype = _qparams(g, q)
    if scale.size != 1:
        raise QatkitError(f"QuantizeLinear {q.name!r} is per-channel: AIMET encodings name no axis for activations, "
                          "so only per-tensor activation quantizers can be exported as encodings")
    scale, zp = float(scale.reshape(())), int(zp.reshape(()))
    lo_c, hi_c = CONTAINERS[dtype]
    clip = _narrow_clip(g, q, scale, zp, dtype)
    nodes, src, (qmin, qmax) = [q, *dqs], q.input[0], (lo_c, hi_c)
    if clip is not None:
        nodes, src, qmin, qmax = [clip[0], *nodes], clip[0].input[0], clip[1], clip[2]
    return _Pair(src, nodes, [n.output[0] for n in dqs], Grid.from_qdq(scale, zp, qmin, qmax, lo_c < 0))


class _Stripper:
    """Decides, pair by pair in graph order, where each encoding sits and which names merge."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.g = model, _Graph(model)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.rename: dict[str, str] = {}
        self.activations: dict[str, Grid] = {}
        self.params: dict[str, list[Grid]] = {}
        self.initializers: list[onnx.TensorProto] = []
        self.drop: set[int] = set()
        self.identities: dict[int, list] = {}  # node position -> Identity nodes placed there

    def resolve(self, name: str) -> str:
        while name in self.rename:
            name = self.rename[name]
        return name

    def run(self) -> None:
        g = self.g
        pairs = [(pos, _pair(g, n)) for pos, n in enumerate(g.nodes) if n.op_type == "QuantizeLinear"]
        in_pairs: dict[str, set[int]] = {}
        for _, p in pairs:
            in_pairs.setdefault(p.src, set()).update(id(n) for n in p.nodes)
        for n in g.nodes:
            if n.op_type == "DequantizeLinear" and n.input[0] in g.const:
                values, grids = _dequantized(g, n)
                self.params[n.output[0]] = grids
                self.initializers.append(numpy_helper.from_array(values, n.output[0]))
                self.drop.add(id(n))
        for pos, p in pairs:
            float_readers = [n for n in g.consumers.get(p.src, []) if id(n) not in in_pairs[p.src]]
            self.drop.update(id(n) for n in p.nodes)
            self._place(pos, p, bool(float_readers) or p.src in self.graph_outputs)

    def _place(self, pos: int, p: _Pair, src_read_float: bool) -> None:
        src = self.resolve(p.src)
        named_outputs = [o for o in p.outputs if o in self.graph_outputs]
        if len(named_outputs) > 1:
            raise QatkitError(f"QuantizeLinear {p.nodes[-len(p.outputs) - 1].name!r} feeds {named_outputs} as graph "
                              "outputs: one quantized tensor can carry one name")
        known = self.activations.get(src)
        renamable = src == p.src and src not in self.graph_inputs and p.src not in self.g.const
        if not src_read_float and known in (None, p.grid) and (not named_outputs or (renamable and known is None)):
            target = named_outputs[0] if named_outputs else src
            if target != src:
                self.rename[src] = target
            for o in p.outputs:
                if o != target:
                    self.rename[o] = target
        else:  # the quantized copy needs its own name
            target = named_outputs[0] if named_outputs else p.outputs[0]
            for o in p.outputs:
                if o != target:
                    self.rename[o] = target
            self.identities.setdefault(pos, []).append(
                helper.make_node("Identity", [src], [target], name=f"{target}/identity"))
        self.activations[target] = p.grid

    def float_model(self) -> onnx.ModelProto:
        model, nodes = self.model, []
        for pos, n in enumerate(self.g.nodes):
            nodes.extend(self.identities.get(pos, []))
            if id(n) not in self.drop:
                nodes.append(n)
        for n in nodes:
            n.input[:] = [self.resolve(i) for i in n.input]
            n.output[:] = [self.resolve(o) for o in n.output]
        used = {i for n in nodes for i in n.input} | self.graph_outputs
        nodes = [n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
        graph = model.graph
        kept_inits = [t for t in graph.initializer if t.name in used]
        graph.ClearField("node")
        graph.node.extend(nodes)
        graph.ClearField("initializer")
        graph.initializer.extend(kept_inits + [t for t in self.initializers if t.name in used])
        present = {o for n in nodes for o in n.output} | {t.name for t in graph.initializer}
        kept_info = [v for v in graph.value_info if v.name in present]
        graph.ClearField("value_info")
        graph.value_info.extend(kept_info)
        return model

    def encodings(self) -> dict:
        acts = {self.resolve(k): [v.to_json()] for k, v in self.activations.items()}
        params = {k: [gr.to_json() for gr in v] for k, v in self.params.items()}
        return {"version": ENCODINGS_VERSION, "activation_encodings": acts, "param_encodings": params}


def strip_qdq(qdq_onnx: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Turn a QDQ ONNX model into a float ONNX model (``out``) plus its AIMET-style encodings beside it.

    Args:
        qdq_onnx: a model written by :func:`qatkit.export_onnx` (any QDQ model with constant scales and zero points
            works: QuantizeLinear feeding only DequantizeLinear, weights as integer constants).
        out: the float ONNX file to write; the encodings go to ``out`` with the suffix ``.encodings``.

    Returns:
        ``(float_onnx_path, encodings_path)``. Every tensor named in the encodings exists in the float model:
        activation encodings name node outputs or graph inputs, parameter encodings name initializers.

    Raises:
        QatkitError: a QuantizeLinear that feeds other ops than DequantizeLinear, a per-channel activation
            quantizer, or a constant of a non-integer type under a DequantizeLinear.

    Example:
        >>> qatkit.export_onnx(qm, (x,), "model.qdq.onnx")                             # doctest: +SKIP
        >>> strip_qdq("model.qdq.onnx", "model.onnx")                                  # doctest: +SKIP
        (PosixPath('model.onnx'), PosixPath('model.encodings'))
    """
    import json

    out = Path(out)
    stripper = _Stripper(onnx.load(str(qdq_onnx)))
    stripper.run()
    model = stripper.float_model()
    leftover = sorted({n.op_type for n in model.graph.node} & {"QuantizeLinear", "DequantizeLinear"})
    if leftover:
        raise QatkitError(f"{qdq_onnx}: {leftover} nodes remain after stripping (not of the QDQ form qatkit exports)")
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    encodings = out.with_suffix(".encodings")
    encodings.write_text(json.dumps(stripper.encodings(), indent=1))
    return out, encodings
