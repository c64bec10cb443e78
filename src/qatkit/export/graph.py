"""Reading an ONNX graph's constants (initializers and Constant nodes, by the tensor name their readers use) and its
real inputs.

Shared by export (16-bit widening, unsigned activations), verify (tap zero points) and inspect (Q/DQ parameters).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph's real inputs, in order: its ``input`` entries that are not initializers (older files list their
    weights as inputs too).

    Args:
        graph: an ONNX graph.

    Example::

        names = [i.name for i in graph_inputs(model.graph)]  # ["images"]
    """
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every constant of ``graph`` as its TensorProto (edit one in place to change the graph).

    Args:
        graph: an ONNX graph.

    Example::

        consts = constant_tensors(model.graph)
        zero_point = consts[node.input[2]]  # a QuantizeLinear's zero point, initializer or Constant node
    """
    found = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            found |= {n.output[0]: a.t for a in n.attribute
                      if a.name == "value" and a.type == onnx.AttributeProto.TENSOR}
    return found


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant of ``graph`` as a numpy array (see :func:`constant_tensors`).

    Args:
        graph: an ONNX graph.

    Example::

        scale = constant_values(model.graph)[node.input[1]]
    """
    return {name: numpy_helper.to_array(t) for name, t in constant_tensors(graph).items()}
