"""Float ONNX + encodings -> QDQ ONNX: re-insert QuantizeLinear/DequantizeLinear exactly as qatkit's export writes them.

* A parameter encoding turns its float initializer into integer codes (round half to even, clipped to the grid)
  read by a DequantizeLinear that takes over the initializer's name, with its zero point written out (int32 biases:
  0) as qatkit's export does; ``axis`` from the reading op (1 for ConvTranspose, the last for MatMul, else 0).
* An activation encoding on a tensor made by a node renames that output to ``<name>/float`` and adds
  ``[Clip] -> QuantizeLinear -> DequantizeLinear`` writing ``<name>``, so every reader (and a graph output)
  now reads the quantized value. On a graph input the readers are moved to ``<name>/dq`` instead.
* The Clip is added when the grid is narrower than its container, with the bounds qatkit's export computes.
Scales and zero points are 0-d for per-tensor grids (a ``[1]`` scale stops ORT fusing Add/Mul, docs/design.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import QatkitError
from .grid import Grid

_ONNX_INT16_OPSET = 21  # QuantizeLinear/DequantizeLinear take int16/uint16 from opset 21


def read_encodings(encodings: str | Path | dict) -> tuple[dict[str, Grid], dict[str, list[Grid]]]:
    """Activation and parameter grids of an AIMET-style encodings file (or its parsed JSON).

    Args:
        encodings: path of a ``.encodings`` JSON file, or the dict it holds.

    Returns:
        ``(activations, params)``: ``{tensor: Grid}`` and ``{initializer: [Grid per channel]}``.

    Example:
        >>> acts, params = read_encodings("model.encodings")                           # doctest: +SKIP
        >>> acts["images"].bits                                                        # doctest: +SKIP
        8
    """
    data = encodings if isinstance(encodings, dict) else json.loads(Path(encodings).read_text())
    if not isinstance(data, dict) or not {"activation_encodings", "param_encodings"} <= set(data):
        raise QatkitError("an encodings file needs 'activation_encodings' and 'param_encodings' (AIMET format "
                          "0.6.1); write one with qatkit.export_encodings")
    acts = {}
    for name, entries in data["activation_encodings"].items():
        entries = entries if isinstance(entries, list) else [entries]
        if len(entries) != 1:
            raise QatkitError(f"activation encoding of {name!r} has {len(entries)} entries: per-channel activation "
                              "encodings name no axis; give one entry per activation tensor")
        acts[name] = Grid.from_json(entries[0], name)
    params = {name: [Grid.from_json(e, name) for e in (entries if isinstance(entries, list) else [entries])]
              for name, entries in data["param_encodings"].items()}
    both = sorted(set(acts) & set(params))
    if both:
        raise QatkitError(f"{both[:5]} have both an activation and a parameter encoding: keep one per tensor")
    return acts, params


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model, self.graph = model, graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: (i, n) for i, n in enumerate(graph.node) for o in n.output}
        self.inputs = {i.name for i in graph.input}
        self.new_inits: list[onnx.TensorProto] = []
        self.prefix: list[onnx.NodeProto] = []  # nodes before the original ones (parameter DQs, graph-input Q/DQs)
        self.after: dict[int, list[onnx.NodeProto]] = {}  # original node index -> Q/DQ nodes right after it
        self.readers_move: dict[str, str] = {}  # graph input -> its DequantizeLinear output, for original nodes

    def const(self, name: str, value: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qparams(self, name: str, grids: list[Grid]) -> tuple[list[str], list]:
        """QuantizeLinear/DequantizeLinear inputs 1-2 (scale, zero point) and the grids' containers."""
        containers = [gr.container() for gr in grids]
        if len({c.dtype for c in containers}) != 1:
            raise QatkitError(f"the channels of {name!r} need different integer types: give them one bitwidth")
        dtype = containers[0].dtype
        per_channel = len(grids) > 1
        scale = np.array([gr.scale for gr in grids], np.float32)
        zp = np.array([c.zero_point for c in containers], dtype)
        names = [self.const(f"{name}/scale", scale if per_channel else scale.reshape(())),
                 self.const(f"{name}/zero_point", zp if per_channel else zp.reshape(()))]  # explicit, as the export
        return names, containers

    def param(self, name: str, grids: list[Grid]) -> None:
        if name not in self.inits:
            raise QatkitError(f"parameter encoding for {name!r}, which is not an initializer of the float model: "
                              "parameter encodings name weights and biases (initializers)")
        w = numpy_helper.to_array(self.inits.pop(name)).astype(np.float64)
        qnames, containers = self.qparams(name, grids)
        attrs, shape = {}, [1] * w.ndim
        if len(grids) > 1:
            attrs["axis"] = axis = self._param_axis(name, w, len(grids))
            shape[axis] = -1
        scale = np.array([gr.scale for gr in grids], np.float64).reshape(shape)
        zp = np.array([c.zero_point for c in containers], np.int64).reshape(shape)
        qmin = np.array([c.qmin for c in containers], np.int64).reshape(shape)
        qmax = np.array([c.qmax for c in containers], np.int64).reshape(shape)
        codes = np.clip(np.rint(w / scale).astype(np.int64) + zp, qmin, qmax).astype(containers[0].dtype)
        codes_name = self.const(f"{name}/codes", codes)
        self.prefix.append(helper.make_node("DequantizeLinear", [codes_name, *qnames], [name],
                                            name=f"{name}/DequantizeLinear", **attrs))

    def _param_axis(self, name: str, w: np.ndarray, channels: int) -> int:
        readers = {n.op_type for n in self.graph.node if name in n.input}
        axis = 1 if "ConvTranspose" in readers else w.ndim - 1 if "MatMul" in readers else 0
        if w.ndim == 0 or w.shape[axis] != channels:
            raise QatkitError(f"parameter {name!r} of shape {list(w.shape)} has {channels} per-channel encodings, "
                              f"but its channel axis {axis} (read by {sorted(readers)}) does not have that size")
        return axis

    def activation(self, name: str, grid: Grid) -> None:
        src, out = f"{name}/float", name
        if name in self.producer:
            index, node = self.producer[name]
            node.output[list(node.output).index(name)] = src
            where = self.after.setdefault(index, [])
        elif name in self.inputs or name in self.inits:
            src, out = name, f"{name}/dq"
            self.readers_move[name] = out
            where = self.prefix
        else:
            raise QatkitError(f"activation encoding for {name!r}, which no node of the float model writes and "
                              "which is no graph input: the encodings belong to another model")
        qnames, (container,) = self.qparams(name, [grid])
        if not container.full:  # grid narrower than its container: clip first, as qatkit's export does
            lo, hi = grid.clip_range()
            clip_inputs = [src, self.const(f"{name}/clip_min", lo), self.const(f"{name}/clip_max", hi)]
            where.append(helper.make_node("Clip", clip_inputs, [f"{name}/clipped"], name=f"{name}/Clip"))
            src = f"{name}/clipped"
        where.append(helper.make_node("QuantizeLinear", [src, *qnames], [f"{name}/quantized"],
                                      name=f"{name}/QuantizeLinear"))
        where.append(helper.make_node("DequantizeLinear", [f"{name}/quantized", *qnames], [out],
                                      name=f"{name}/DequantizeLinear"))

    def build(self) -> onnx.ModelProto:
        graph, nodes = self.graph, list(self.prefix)
        for i, node in enumerate(graph.node):
            node.input[:] = [self.readers_move.get(n, n) for n in node.input]
            nodes.append(node)
            nodes.extend(self.after.get(i, []))
        graph.ClearField("node")
        graph.node.extend(nodes)
        kept = list(self.inits.values())
        graph.ClearField("initializer")
        graph.initializer.extend(kept + self.new_inits)
        return self.model


def qdq_from_encodings(float_onnx: str | Path, encodings: str | Path | dict, out: str | Path) -> Path:
    """Re-insert QuantizeLinear/DequantizeLinear into a float ONNX model from its encodings; returns ``out``.

    The inverse of :func:`qatkit.export_encodings`: for a pair it wrote, the result computes in ONNX Runtime what
    the QDQ model of :func:`qatkit.export_onnx` computes (``tests/test_encodings.py`` checks the outputs are
    identical). Encodings from other tools work when they follow AIMET's format 0.6.1.

    Args:
        float_onnx: the float model (no Q/DQ) whose tensor names the encodings use.
        encodings: the ``.encodings`` file, or its parsed JSON.
        out: where to write the QDQ model.

    Raises:
        QatkitError: an encoding names a tensor the model does not have, is malformed, or needs 16-bit types in a
            model below opset 21.

    Example:
        >>> onnx_path, enc_path = qatkit.export_encodings(qm, (x,), "model.onnx")      # doctest: +SKIP
        >>> qdq_from_encodings(onnx_path, enc_path, "model.qdq.onnx")                  # doctest: +SKIP
        PosixPath('model.qdq.onnx')
    """
    model = onnx.load(str(float_onnx))
    acts, params = read_encodings(encodings)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    wide = sorted(n for n, grids in [*((k, [v]) for k, v in acts.items()), *params.items()]
                  if any(8 < gr.bits <= 16 for gr in grids))
    if wide and opset < _ONNX_INT16_OPSET:
        raise QatkitError(f"{len(wide)} encodings ({wide[:3]}...) need 16-bit QuantizeLinear, which ONNX has from "
                          f"opset {_ONNX_INT16_OPSET}; the model is opset {opset}: export it with "
                          f"opset={_ONNX_INT16_OPSET}")
    builder = _Builder(model)
    for name, grids in params.items():
        builder.param(name, grids)
    for name, grid in acts.items():
        builder.activation(name, grid)
    model = builder.build()
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out
