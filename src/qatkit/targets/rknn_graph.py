"""The copy of a QDQ ONNX file that rknn-toolkit2 builds: a fixed batch, and every tapped QuantizeLinear readable.

:func:`qatkit.verify` adds each activation QuantizeLinear's output as a graph output, to read its integer codes. The
toolkit folds each Q/DQ pair into its tensor's quantization and refuses Q/DQ outputs as graph outputs, so the copy
exposes the float tensor each QuantizeLinear reads (the NPU holds it on that Q's grid) and :class:`Codes` turns the
simulator's dequantized values back into codes. The toolkit also keeps only one of several exposed tensors that are
one tensor to it: a view (Reshape, Flatten, ...) of another, or a Q -> DQ of another (measured on resnet18: of
GlobalAveragePool's output and its Flatten it returned only the Flatten). So tensors are grouped into such classes
and each class is exposed once; every member is read from that one, reshaped. A model output that is a
DequantizeLinear's (YOLO's raw head maps under an all-activation recipe) makes the toolkit's build fail
(``KeyError: 'output3_dup'``): the copy outputs the tensor that pair quantizes, whose dequantized values the simulator
returns, which are that output's values. The same copy is what :func:`qatkit.targets.rockchip.compile_rknn` builds:
the ``.rknn`` file's outputs are the ONNX file's, in order, under those tensors' names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime

from ..errors import QatkitError
from ..export.graph import constant_values, graph_inputs

VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


@dataclass(frozen=True)
class Codes:
    """A graph output that is a QuantizeLinear's codes, from a float tensor of the same values on that Q's grid."""

    source: int  # index into the toolkit's outputs, or into the inputs when ``from_input``
    shape: tuple[int, ...]  # the tapped tensor's shape after its batch dimension
    scale: float
    zero_point: int
    dtype: np.dtype
    from_input: bool = False

    def of(self, values: np.ndarray) -> np.ndarray:
        """The codes of ``values`` (batch first), in the tapped tensor's shape."""
        if values[0].size != int(np.prod(self.shape)):
            raise QatkitError(f"rknn verify: the toolkit returned a tensor of {values[0].size} values per image where "
                              f"{self.shape} was exposed; this is a qatkit bug, please report it with the model")
        info = np.iinfo(self.dtype)
        codes = np.rint(values.astype(np.float64).reshape(len(values), *self.shape) / self.scale) + self.zero_point
        return np.clip(codes, info.min, info.max).astype(self.dtype)


def fix_batch(model: onnx.ModelProto) -> int | None:
    """Set a symbolic batch dimension of the inputs to 1 (in place; outputs' shapes are cleared for the toolkit to
    infer); returns the file's own fixed batch, or None where it was symbolic.

    Raises:
        QatkitError: a symbolic dimension other than the batch (the toolkit compiles fixed sizes).
    """
    graph, batch = model.graph, None
    for value in graph_inputs(graph):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in list(dims)[1:]):
            raise QatkitError(f"the rknn toolkit needs fixed input sizes; input {value.name!r} has a symbolic size "
                              "other than the batch: export at the fixed image size you deploy")
        if dims and dims[0].HasField("dim_value"):
            batch = dims[0].dim_value
        elif dims:
            dims[0].dim_value = 1
    if batch is None:
        for value in graph.output:
            value.type.tensor_type.ClearField("shape")
    return batch


class _Classes:
    """Union-find over tensor names: the tensors the toolkit treats as one."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        while self.parent.get(name, name) != name:
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(b)] = self.find(a)


def expose_quantize_inputs(model: onnx.ModelProto) -> list[int | Codes]:
    """Rewrite ``model``'s graph outputs (in place) into what the toolkit can return: outputs that are not
    QuantizeLinear outputs stay, each tapped Q's class (module docstring) is exposed once. Returns, for each
    original output, its index among the new outputs or the :class:`Codes` that compute it.

    Args:
        model: a QDQ model with a fixed batch (:func:`fix_batch`).
    """
    graph = model.graph
    consts, inputs = constant_values(graph), [i.name for i in graph_inputs(graph)]
    producer = {out: n for n in graph.node for out in n.output}
    classes, order = _Classes(), {name: i for i, name in enumerate(inputs)}
    dequantizes: dict[str, str] = {}  # an activation DequantizeLinear's output -> the tensor its Q reads
    for i, node in enumerate(graph.node):
        for out in node.output:
            order[out] = len(inputs) + i
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type in VIEWS:
            classes.union(node.input[0], node.output[0])
        elif node.op_type == "DequantizeLinear" and source is not None and source.op_type == "QuantizeLinear" \
                and source.input[0] not in consts:
            classes.union(source.input[0], node.output[0])
            dequantizes[node.output[0]] = source.input[0]

    def held(name: str) -> str:  # the toolkit fails on a DequantizeLinear output as a graph output ('..._dup')
        while name in dequantizes:
            name = dequantizes[name]
        return name

    quantize = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    wanted = [held(o.name if o.name not in quantize else quantize[o.name].input[0]) for o in graph.output]
    members: dict[str, list[str]] = {}
    for name in wanted:
        members.setdefault(classes.find(name), []).append(name)
    shapes = _shapes(model, wanted)
    kept = {w for o, w in zip(graph.output, wanted) if o.name == w}  # model outputs the toolkit returns as they are
    names: list[str] = []

    def slot(name: str) -> int:
        group = members[classes.find(name)]
        own = [m for m in group if m in kept]  # a model output the class holds is returned as such
        chosen = own[0] if own else max(group, key=lambda m: order.get(m, -1))  # else the last one computed
        if chosen not in names:
            names.append(chosen)
        return names.index(chosen)

    plan: list[int | Codes] = []
    for out, tensor in zip(graph.output, wanted):
        q = quantize.get(out.name)
        if q is None:
            plan.append(slot(tensor))
            continue
        scale, zp = consts[q.input[1]], consts[q.input[2]]
        if scale.size != 1:
            raise QatkitError(f"rknn verify: QuantizeLinear {q.name!r} is per-channel on an activation; only "
                              "per-tensor activation grids can be read back from the toolkit")
        group_inputs = [m for m in inputs if classes.find(m) == classes.find(tensor)]
        source = inputs.index(group_inputs[0]) if group_inputs else slot(tensor)
        plan.append(Codes(source, tuple(shapes[tensor][1:]), float(scale.reshape(())), int(zp.reshape(())),
                          zp.dtype, bool(group_inputs)))
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return plan


def _shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``names`` at the model's fixed input sizes, from one ONNX Runtime run on zeros (shape inference
    leaves some unknown, after Resize or Concat of computed sizes)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names))
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim],
                             onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in graph_inputs(probe.graph)}
    return {n: tuple(a.shape) for n, a in zip(dict.fromkeys(names), session.run(None, feed))}
