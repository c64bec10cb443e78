"""What a captured graph says about a model, whatever the recipe: who reads each tensor, where the head ends.

These facts are computed once per placement and only read afterwards.
"""
from __future__ import annotations

from torch import nn

from ..capture import Edge, Graph, Node
from ..plan import module_of

COMPUTE = ("conv", "linear")  # node kinds of the layers that carry weight quantizers


class GraphFacts:
    """Consumers, value origins and the model head of one captured ``graph`` of ``model``.

    Example usage::

        facts = GraphFacts(graph, model)
        facts.only_consumer(node)      # the one node that reads node's output, if there is exactly one
        facts.origin(edge)             # the tensor a view/pool/upsample chain started from
        facts.output_layers            # keys of the last trainable conv/linear layers
    """

    def __init__(self, graph: Graph, model: nn.Module) -> None:
        self.graph, self.model = graph, model
        self.output_edges = set(graph.outputs)
        self.users: dict[Edge, list[Node]] = {}
        for n in graph.nodes.values():
            for e in n.inputs:
                if e is not None:
                    self.users.setdefault(e, []).append(n)
        self.order = {key: i for i, key in enumerate(graph.nodes)}  # execution order of the nodes
        self.output_layers, self.decode_tail = self._find_head()

    def _find_head(self) -> tuple[set[str], set[str]]:
        """Output layers (trainable conv/linear with no trainable layer after them) and the decode tail after them.

        Trainable = has weights that require grad (YOLO's DFL conv has fixed weights: it is decode arithmetic).
        If no layer requires grad (a frozen model), every conv/linear counts as trainable.
        """
        if self.graph.fallback:  # no dataflow: nothing is known to come after anything
            return set(), set()
        compute = [n for n in self.graph.nodes.values() if self.is_layer(n)]
        trainable = {n.key for n in compute
                     if any(p.requires_grad for p in self.model.get_submodule(n.module).parameters())}
        trainable = trainable or {n.key for n in compute}
        below: dict[str, bool] = {}  # a trainable layer reads this node's output, directly or further down
        for n in reversed(list(self.graph.nodes.values())):
            below[n.key] = any(u.key in trainable or below.get(u.key, False)
                               for i in range(n.num_outputs) for u in self.users.get((n.key, i), []))
        output_layers = {k for k in trainable if not below[k]}
        tail = {n.key for n in self.graph.nodes.values()
                if n.kind != "input" and n.key not in trainable and not below[n.key]}
        return output_layers, tail

    @staticmethod
    def is_layer(node: Node) -> bool:
        """A conv/linear module call (a functional ``F.conv2d`` in a custom module is not one: no weight module)."""
        return node.kind in COMPUTE and node.module is not None

    @staticmethod
    def name(node: Node) -> str:
        """How rules name ``node``: its module path, its op key, or ``""`` for a model input (the root's)."""
        return "" if node.kind == "input" else node.module or node.key

    @staticmethod
    def module_path(node: Node) -> str:
        """The module ``node`` is (a module call) or runs in (a functional op)."""
        return node.module or module_of(node.key)

    def producer(self, edge: Edge) -> Node:
        return self.graph.nodes[edge[0]]

    def owners(self, path: str) -> list[nn.Module]:
        """The root and each module along ``path`` (names the capture could not resolve are left out)."""
        parts, owners = path.split(".") if path else [], [self.model]
        for i in range(len(parts)):
            try:
                owners.append(self.model.get_submodule(".".join(parts[: i + 1])))
            except AttributeError:
                continue
        return owners

    def type_name(self, path: str) -> str:
        """Class name of the module at ``path`` (of its innermost resolvable owner)."""
        return type(self.owners(path)[-1]).__name__

    def only_consumer(self, node: Node) -> Node | None:
        """The node that alone reads ``node``'s single output, if any."""
        users = self.users.get((node.key, 0), [])
        return users[0] if len(users) == 1 and node.num_outputs == 1 else None

    def origin(self, edge: Edge | None) -> Edge | None:
        """The tensor ``edge`` is a view/pooled/upsampled copy of (walking back through shape ops)."""
        while edge is not None:
            node = self.producer(edge)
            if node.kind != "shape" or not node.inputs or node.inputs[0] is None:
                return edge
            edge = node.inputs[0]
        return edge
