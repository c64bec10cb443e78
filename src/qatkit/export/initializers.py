"""Constants as initializers: each tensor-valued Constant node of the exported graph becomes a graph initializer.

PyTorch's TorchScript exporter writes every scale, zero point and integer weight as a ``Constant`` node. Legal
ONNX, but the files vendor compilers are tested on (ORT's ``quantize_static``, ModelOpt's) keep them as
initializers, and some toolchains look for a Q/DQ node's parameters there only. Moving them changes no value and no
tensor name, so runtimes compute exactly the same thing (tests/test_export_ort.py).
"""
from __future__ import annotations

import onnx


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move every Constant node of ``model``'s main graph that holds a tensor (``value``) into
    ``graph.initializer`` under its output name (in place); returns how many moved.

    Constants inside subgraphs (If/Loop bodies) and those given by other attributes (``value_float``, ...) stay.

    Args:
        model: an ONNX model.

    Example::

        model = onnx.load("model.qdq.onnx")
        constants_to_initializers(model)   # QuantizeLinear(x, scale, zero_point) now reads two initializers
        onnx.save(model, "model.qdq.onnx")
    """
    graph = model.graph
    kept, moved = [], []
    for node in graph.node:
        value = [a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value[0].t)
            tensor.name = node.output[0]
            moved.append(tensor)
        else:
            kept.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(moved)
    return len(moved)
