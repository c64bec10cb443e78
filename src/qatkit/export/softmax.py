"""A float Softmax over an inner axis, rewritten as reductions and element-wise ops for ONNX Runtime.

ORT's CPU Softmax works one row at a time along the softmax axis (moving a non-last axis last first). YOLOv8's DFL
takes the softmax over 16 bins on axis 1 of ``(N, 16, 4, anchors)``: 4 * anchors rows of 16 values, each paying the
per-row cost. The same function as ``ReduceMax -> Sub -> Exp -> ReduceSum -> Div`` runs every op along the
contiguous anchor axis instead. Measured in ORT (CPU with AVX-512 VNNI, 1 thread; docs/performance.md): 0.72 ms ->
0.12 ms on ``1x16x4x2100`` (yolov8n at 320 px), 3.04 ms -> 0.47 ms at 640 px; largest difference 4.8e-7. OpenVINO
runs both forms in the same time (it fuses them back), so the rewrite is on for the ``onnxruntime`` recipe only
(``decompose_softmax``).

Left alone: a Softmax over the last axis (ORT's own kernel is fast there), one that reads a DequantizeLinear or
feeds a QuantizeLinear (ORT fuses that into QLinearSoftmax), and one whose input rank is unknown.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def decompose_softmax(model: onnx.ModelProto) -> int:
    """Rewrite each float Softmax over a non-last axis of ``model`` (in place) as max, subtract, exp, sum and
    divide over that axis; the last node keeps the Softmax's output name, so layer-wise verify still finds it.

    Args:
        model: an ONNX model of opset 13 or later (earlier Softmax flattens to 2-D: left alone).

    Returns:
        How many Softmax nodes were rewritten.

    Example::

        >>> m = onnx.load("model.qdq.onnx"); decompose_softmax(m); onnx.save(m, "model.qdq.onnx")
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = model.graph
    if opset < 13 or not any(node.op_type == "Softmax" for node in graph.node):
        return 0  # (shape inference over the whole graph only where there is a Softmax to look at)
    ranks = _ranks(model)
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    nodes: list[onnx.NodeProto] = []
    done = 0
    for node in graph.node:
        axis = _inner_axis(node, ranks)
        if axis is None or _between_qdq(node, producers, readers):
            nodes.append(node)
            continue
        nodes.extend(_decomposed(graph, node, axis, opset, done))
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
    return done


def _between_qdq(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                 readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether the node reads a DequantizeLinear or feeds a QuantizeLinear (ORT then fuses a QLinear op)."""
    source = producers.get(node.input[0]) if node.input else None
    return (source is not None and source.op_type == "DequantizeLinear") or any(
        r.op_type == "QuantizeLinear" for r in (readers.get(node.output[0], []) if node.output else []))


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor whose shape ONNX shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _inner_axis(node: onnx.NodeProto, ranks: dict[str, int]) -> int | None:
    """The non-negative axis of a Softmax that is not over its input's last axis, else None."""
    if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
        return None
    rank = ranks.get(node.input[0])
    if not rank:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    axis = axis + rank if axis < 0 else axis
    return axis if axis < rank - 1 else None


def _decomposed(graph: onnx.GraphProto, node: onnx.NodeProto, axis: int, opset: int,
                index: int) -> list[onnx.NodeProto]:
    """``exp(x - max(x)) / sum(exp(x - max(x)))`` over ``axis``: ReduceMax takes its axes as an attribute before
    opset 18, ReduceSum as an input from opset 13."""
    x, y = node.input[0], node.output[0]
    base = f"{node.name or 'Softmax'}_decomposed{index}"
    axes = f"{base}_axes"
    graph.initializer.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axes))
    peak, shifted, exps, total = (f"{base}_{s}" for s in ("max", "shifted", "exp", "sum"))
    if opset >= 18:
        reduce_max = helper.make_node("ReduceMax", [x, axes], [peak], name=f"{base}/ReduceMax", keepdims=1)
    else:
        reduce_max = helper.make_node("ReduceMax", [x], [peak], name=f"{base}/ReduceMax", axes=[axis], keepdims=1)
    return [reduce_max,
            helper.make_node("Sub", [x, peak], [shifted], name=f"{base}/Sub"),
            helper.make_node("Exp", [shifted], [exps], name=f"{base}/Exp"),
            helper.make_node("ReduceSum", [exps, axes], [total], name=f"{base}/ReduceSum", keepdims=1),
            helper.make_node("Div", [exps, total], [y], name=f"{base}/Div")]
