"""Signed activation grids re-expressed on the equivalent unsigned container, for runtimes that want uint8.

A signed grid ``[qmin, qmax]`` with zero point ``z`` (int8) holds exactly the same real values as the grid
``[qmin + 128, qmax + 128]`` with zero point ``z + 128`` (uint8): ``(q - z) * s`` is unchanged, and QuantizeLinear's
rounding and saturation land on the same values. (16-bit grids shift by 32768 into uint16.) Why it matters:
OpenVINO's CPU plugin computes some signed-int8 activation graphs wrongly (CSP concats of the ``tensorrt`` and
``npu-int8-sym`` recipes: tens of steps off, docs/openvino.md) and computes the same model on the unsigned grid
exactly. TensorRT needs the signed, zero-point-0 form, so this is an export option, not the default.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import constant_values

SHIFTS = {np.dtype(np.int8): (np.uint8, 128), np.dtype(np.int16): (np.uint16, 32768)}


def to_unsigned_activations(model: onnx.ModelProto) -> int:
    """Rewrite every signed activation QuantizeLinear/DequantizeLinear pair of ``model`` onto the unsigned
    container (in place); weights and biases keep their signed constants. Returns how many pairs changed.

    Each pair gets its own new zero-point initializer, so constants shared with other nodes are never altered.

    Args:
        model: a QDQ ONNX model (as qatkit's export writes it).

    Example::

        model = onnx.load("model.qdq.onnx")
        to_unsigned_activations(model)  # int8 zero point 0 -> uint8 zero point 128, same real values
        onnx.save(model, "model.u8.qdq.onnx")
    """
    graph = model.graph
    consts = constant_values(graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    changed = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]:
        if len(q.input) < 3 or q.input[2] not in consts:
            continue
        zp = consts[q.input[2]]
        if zp.dtype not in SHIFTS:
            continue
        dtype, shift = SHIFTS[zp.dtype]
        name = f"{q.output[0]}/unsigned_zero_point"
        graph.initializer.append(numpy_helper.from_array((zp.astype(np.int64) + shift).astype(dtype), name))
        for node in [q] + [r for r in readers.get(q.output[0], []) if r.op_type == "DequantizeLinear"]:
            node.input[2] = name
        changed += 1
    return changed
