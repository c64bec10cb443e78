"""``compute_inputs`` (TensorRT explicit Q/DQ): quantizers where TensorRT reads int8.

Conv/linear inputs and weights, max-pool inputs, matmul operands and residual adds (seed 004: the add input that is
not the fusing conv's output gets Q/DQ, so TensorRT fuses conv+add in int8). One quantizer per *value*: a tensor and
everything shape ops make of it (max-pool, nearest upsample, reshape, split) share one, so a max-pool's input and
output have one scale. BatchNorm folded.
"""
from __future__ import annotations

from ..capture import Edge, Node
from ..plan import quantizer_name
from .policy import Policy


class ComputeInputs(Policy):
    """Quantizers on values, applied where compute reads them; model outputs stay float."""

    name = "compute_inputs"

    def place(self, node: Node) -> None:
        b = self.builder
        if self.facts.is_layer(node) and node.inputs:
            if not b.float_output_layer(node):
                self.value_q(node, 0)
                b.add_weight(node)
        elif node.kind == "shape" and "maxpool" in node.op.lower().replace("_", "") and node.inputs:
            self.value_q(node, 0)  # TensorRT runs max-pool in int8 on one scale in and out
        elif node.kind == "matmul":  # activation x activation: both operands in int8
            for i, e in enumerate(node.inputs):
                if e is not None:
                    self.value_q(node, i)
        elif node.kind == "add" and len([e for e in node.inputs if e is not None]) > 1:
            self._residual_add(node)

    def _residual_add(self, node: Node) -> None:
        """seed 004: TensorRT fuses conv + residual add when the other input carries Q/DQ. The conv executed last
        is the fusing one; with no conv input, both inputs are quantized (the add runs in int8)."""
        convs = [i for i, e in enumerate(node.inputs) if e is not None and self._conv_output(e)]
        fused = max(convs, key=lambda i: self.facts.order[node.inputs[i][0]]) if convs else None
        for i, e in enumerate(node.inputs):
            if e is not None and i != fused:
                self.value_q(node, i)

    def _conv_output(self, edge: Edge) -> bool:
        """``edge`` is the output of a quantized conv/linear (or of the BatchNorm folded into one)."""
        node = self.facts.producer(edge)
        if node.kind == "bn" and node.inputs and node.inputs[0] is not None:
            node = self.facts.producer(node.inputs[0])
        return self.facts.is_layer(node) and not self.rules.skipped(node)

    def value_q(self, node: Node, i: int) -> str:
        """The one quantizer of the value read by ``node``'s input ``i``, applied at this node."""
        b = self.builder
        edge = self.facts.origin(node.inputs[i])
        q = b.edge_q.get(edge) if edge is not None else None
        if q is None:
            owner, role = (edge[0], f"output{edge[1]}") if edge else (node.key, f"input{i}")
            q = b.new_act(node, quantizer_name(owner, role))
            if edge is not None:
                b.edge_q[edge] = q
        b.site(node).inputs[i] = q
        return q

    def _quantized_before(self, edge: Edge) -> bool:
        return False  # the value's one quantizer is applied at every boundary it crosses

    def _quantize_entry(self, node: Node, i: int, edge: Edge, module: str) -> None:
        self.value_q(node, i)

    def concat_group(self, node: Node) -> list[str]:
        edges = [self.facts.origin(e) for e in self.concat_edges(node)]
        return [self.builder.edge_q[e] for e in edges if e in self.builder.edge_q]

    def model_outputs(self) -> list[str | None]:
        return [None for _ in self.facts.graph.outputs]
