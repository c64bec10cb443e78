"""``all_activations`` (ONNX Runtime): every activation tensor carries a quantizer.

Conv/linear/add/mul/cat/sigmoid outputs get their own; SiLU becomes ``x * q(sigmoid(x))``; shape-only ops (max-pool,
nearest upsample, reshape, chunk/split) re-apply their input's quantizer, so input and output share one scale and ORT
can run them on int8 directly; a BatchNorm after a conv is folded into it; conv biases go on the int32 grid
``s_in * s_w``. Every node then reads DQ and writes Q, which ORT fuses into QLinear* kernels.
"""
from __future__ import annotations

from ..capture import Edge, Node
from ..plan import ROOT, Site, input_quantizer, quantizer_name
from .builder import PlacementBuilder
from .policy import Policy

NEW_SCALE = ("add", "mul", "cat", "sigmoid", "pool", "act", "matmul")  # ops whose output gets its own quantizer
RELU_FUSABLE = ("add", "mul", "matmul")  # ... unless a ReLU alone reads it (conv/linear: always)


class AllActivations(Policy):
    """Quantizers on tensors: each node's output carries one, and its readers share it."""

    name = "all_activations"

    def __init__(self, builder: PlacementBuilder) -> None:
        super().__init__(builder)
        self.relu_fused: set[Edge] = set()  # conv outputs left float because a following ReLU is quantized
        self.entry_q: dict[Edge, str] = {}  # quantizers at module boundaries (rule quantize_input)

    def place_model_inputs(self) -> None:
        b = self.builder
        inputs = [n for n in self.facts.graph.nodes.values() if n.kind == "input"]
        if not (b.recipe.quantize_model_input and inputs):
            return
        root = b.out.sites.setdefault(ROOT, Site("input"))
        for i, n in enumerate(inputs):
            q = root.inputs[i] = b.new_act(n, input_quantizer(i))
            b.edge_q[(n.key, 0)] = q

    def place(self, node: Node) -> None:
        b, kind = self.builder, node.kind
        first = node.inputs[0] if node.inputs else None
        if self.facts.is_layer(node):
            self._layer(node, first)
        elif kind == "bn" and b.site(node).identity:
            pass
        elif kind in ("silu", "relu") or kind in NEW_SCALE:
            if first not in self.relu_fused:
                b.quantize_missing_inputs(node)
            if kind == "silu" and b.recipe.silu_to_relu:
                b.site(node).relu = True  # only functional F.silu is left: modules were swapped
            elif kind == "silu":
                key = b.site(node).sigmoid = b.new_act(node, quantizer_name(node.key, "sigmoid"))
                if b.recipe.silu_sigmoid_range == "unit":
                    b.out.quantizers[key].fix_range(0.0, 1.0)
            if kind in RELU_FUSABLE and self._relu_follows(node):
                return  # add+relu: one quantizer, after the relu (ORT drops the relu into QLinearAdd's output)
            b.add_output(node)
        elif kind == "shape" and first in b.edge_q:
            b.set_output(node, b.edge_q[first])

    def _layer(self, node: Node, first: Edge | None) -> None:
        """A conv/linear: input, weight (BatchNorm folded), int32 bias, and output unless a ReLU follows."""
        b = self.builder
        if b.float_output_layer(node):
            return
        b.quantize_missing_inputs(node)
        b.add_weight(node)
        site = b.site(node)
        site.bias_from = site.inputs.get(0) or b.edge_q.get(first)
        nxt = b.folded_bn(node) or node
        if self._relu_follows(nxt):  # conv+relu: only the relu output is quantized, ORT fuses the pair
            return
        b.add_output(node)
        if nxt is not node and (node.key, 0) in b.edge_q:
            b.edge_q[(nxt.key, 0)] = b.edge_q[(node.key, 0)]
        after = self.facts.only_consumer(nxt)
        if (after is not None and after.kind == "silu" and not b.recipe.silu_to_relu and not self.rules.skipped(after)
                and (nxt.key, 0) not in self.facts.output_edges and (node.key, 0) in b.edge_q):
            b.out.silu_reads[node.key] = after.key

    def _relu_follows(self, node: Node) -> bool:
        """Whether a ReLU (that the rules quantize) alone reads ``node``'s output; if so, the output is left to it.

        A ReLU's output quantizer has its zero point at qmin, so ``Op -> Relu -> Q`` is ``Op -> Q`` with the same
        codes: ORT removes the Relu and fuses the rest (QLinearConv, QLinearAdd). A quantizer of its own before the
        ReLU would leave a DequantizeLinear -> QuantizeLinear requantization between them in ORT's graph.
        """
        after = self.facts.only_consumer(node)
        if after is None or after.kind != "relu" or self.rules.skipped(after):
            return False
        self.relu_fused.add((node.key, 0))
        return True

    def _quantized_before(self, edge: Edge) -> bool:
        return edge in self.builder.edge_q  # the producer already quantized it

    def _quantize_entry(self, node: Node, i: int, edge: Edge, module: str) -> None:
        b = self.builder
        if edge not in self.entry_q:
            self.entry_q[edge] = b.new_act(node, quantizer_name(module, f"entry{len(self.entry_q)}"))
        b.site(node).inputs[i] = self.entry_q[edge]

    def concat_group(self, node: Node) -> list[str]:
        edges = self.concat_edges(node)
        if edges[0] not in self.builder.edge_q:
            return []  # a float concat output (a rule) dequantizes its inputs anyway, nothing to share
        return [self.builder.edge_q[e] for e in edges if e in self.builder.edge_q]

    def model_outputs(self) -> list[str | None]:
        return [self.builder.edge_q.get(e) for e in self.facts.graph.outputs]
