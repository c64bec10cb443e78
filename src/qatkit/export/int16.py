"""16-bit Q/DQ in ONNX: the exporter's ``qatkit::`` stand-ins become standard QuantizeLinear/DequantizeLinear.

QuantizeLinear/DequantizeLinear take int16/uint16 from ONNX opset 21, but PyTorch's TorchScript exporter stops at
opset 20 and has no 16-bit integer constants. The quantizer therefore traces a 16-bit Q/DQ as a ``qatkit::`` node
with its zero point (and, for weights, its codes) in int32 plus a ``container`` attribute. Here the rest of the graph
is converted to opset 21 by ONNX's version converter, then each stand-in becomes the standard op with its integer
constants narrowed to the container type (the values fit by construction: they were clipped to the grid).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from ..errors import QatkitError
from .graph import constant_tensors
from ..quant.quantizer import INT16_CONTAINERS, INT16_DOMAIN

OPSET_INT16 = 21  # first opset whose QuantizeLinear/DequantizeLinear take int16/uint16


def _narrow(tensor: onnx.TensorProto, container: str) -> None:
    """Rewrite an int32 constant in place as ``container`` (int16/uint16), checking that its values fit."""
    values = numpy_helper.to_array(tensor)
    info = np.iinfo(container)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise QatkitError(f"export: constant {tensor.name!r} holds values outside {container}; this is a qatkit bug, "
                          "please report it with the recipe used")
    tensor.CopyFrom(numpy_helper.from_array(values.astype(container), tensor.name))


def widen_int16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` with its ``qatkit::`` 16-bit Q/DQ stand-ins rewritten at opset 21 (unchanged if none).

    Args:
        model: an ONNX model as qatkit's exporter wrote it.

    Example::

        model = widen_int16(onnx.load("raw.onnx"))  # QuantizeLinear(x, scale, uint16 zero point), opset 21
    """
    if not any(n.domain == INT16_DOMAIN for n in model.graph.node):
        return model
    model = version_converter.convert_version(model, OPSET_INT16)
    consts = constant_tensors(model.graph)
    narrowed: set[str] = set()
    for node in model.graph.node:
        if node.domain != INT16_DOMAIN:
            continue
        container = next((a.s.decode() for a in node.attribute if a.name == "container"), "")
        if container not in INT16_CONTAINERS:
            raise QatkitError(f"export: node {node.name!r} has no valid 16-bit container attribute ({container!r})")
        # zero point always; for a DequantizeLinear of constant weight codes, the codes too
        names = [node.input[2]] + ([node.input[0]] if node.op_type == "DequantizeLinear" else [])
        for name in names:
            if name in consts and name not in narrowed:
                _narrow(consts[name], container)
                narrowed.add(name)
        node.domain = ""
        kept = [a for a in node.attribute if a.name != "container"]
        del node.attribute[:]
        node.attribute.extend(kept)
    del_domain = [o for o in model.opset_import if o.domain == INT16_DOMAIN]
    for o in del_domain:
        model.opset_import.remove(o)
    return model
