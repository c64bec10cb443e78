"""The placement being written: sites, quantizers and which quantizer each tensor carries, with the steps both
placement policies take (weights with BatchNorm folded in, outputs a rule may keep float, missing inputs)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..capture import Edge, Node
from ..plan import Site, quantizer_name, within
from ..quant.quantizer import FakeQuantizer
from ..quant.scheme import QuantScheme
from ..recipes import Recipe
from .facts import GraphFacts
from .rules_lookup import RuleLookup
from .sharing import ScaleGroups

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class Placement:
    """The result of placement: the site plan and the quantizers it names."""

    sites: dict[str, Site] = field(default_factory=dict)
    quantizers: dict[str, FakeQuantizer] = field(default_factory=dict)
    outputs: list[str | None] = field(default_factory=list)  # quantizer of each model output (None: float)
    float_layers: list[str] = field(default_factory=list)  # conv/linear left float on purpose (recipe or rule)
    # conv site -> the SiLU site that alone reads its output: in training the SiLU's fused kernel may apply the
    # conv's output quantizer (a run-time shortcut with the same result; not part of the site plan)
    silu_reads: dict[str, str] = field(default_factory=dict)


class PlacementBuilder:
    """Writes a :class:`Placement` for one graph and recipe; the policies decide what to call, and in which order.

    Example usage::

        builder = PlacementBuilder(recipe, facts, RuleLookup(recipe, facts))
        builder.add_weight(conv_node)                  # weight quantizer, BatchNorm folded when it alone follows
        builder.add_output(conv_node)                  # output quantizer unless a rule keeps the output float
        builder.edge_q[(conv_node.key, 0)]             # the quantizer that output now carries
    """

    def __init__(self, recipe: Recipe, facts: GraphFacts, rules: RuleLookup) -> None:
        self.recipe, self.facts, self.rules = recipe, facts, rules
        self.out = Placement()
        self.edge_q: dict[Edge, str] = {}  # activation quantizer carried by each tensor
        self.groups = ScaleGroups()  # quantizers that must share one scale, merged by merge_shared()

    def site(self, node: Node) -> Site:
        return self.out.sites.setdefault(node.key, Site(node.kind))

    def new_act(self, node: Node, name: str) -> str:
        """A new activation quantizer ``name`` with ``node``'s activation scheme."""
        self.out.quantizers[name] = FakeQuantizer(self.rules.rule(node).activation, name)
        return name

    # ------------------------------------------------------------ outputs
    def folded_bn(self, node: Node) -> Node | None:
        """The BatchNorm (module, or F.batch_norm inside a BN subclass) that alone reads this conv's output."""
        nxt = self.facts.only_consumer(node)
        if nxt is None or nxt.kind != "bn" or self.rules.skipped(nxt):
            return None
        module = self.facts.owners(self.facts.module_path(nxt))[-1]
        return nxt if isinstance(module, nn.modules.batchnorm._BatchNorm) else None

    def is_model_output(self, node: Node) -> bool:
        """``node``'s output (or that of the BatchNorm folded into it) is a model output."""
        bn = self.folded_bn(node)
        outputs = self.facts.output_edges
        return (node.key, 0) in outputs or (bn is not None and (bn.key, 0) in outputs)

    def output_float(self, node: Node) -> bool:
        """A rule's ``quantize_output: false`` on a module this node's output leaves, or float model outputs."""
        facts = self.facts
        if not self.recipe.quantize_model_outputs and (node.key in facts.output_layers or self.is_model_output(node)):
            return True
        last = self.folded_bn(node) or node
        edges = [(last.key, i) for i in range(last.num_outputs)]
        users = [facts.name(u) for e in edges for u in facts.users.get(e, [])]
        for module, types in self.rules.boundaries(node):
            leaves = any(e in facts.output_edges for e in edges) or any(not within(u, module) for u in users)
            if leaves and self.rules.keeps_output_float(module, types):
                return True
        return False

    def set_output(self, node: Node, q: str | None) -> None:
        """``node``'s outputs carry quantizer ``q`` (nothing happens if ``q`` is None or the output stays float)."""
        if q is None or self.output_float(node):
            return
        self.site(node).output = q
        for i in range(node.num_outputs):
            self.edge_q[(node.key, i)] = q

    def add_output(self, node: Node) -> None:
        """A new quantizer on ``node``'s output, unless a rule says its output stays float."""
        if not self.output_float(node):
            self.set_output(node, self.new_act(node, quantizer_name(node.key, "output")))

    # ------------------------------------------------------------ layers
    def float_output_layer(self, node: Node) -> bool:
        """``keep_output_convs_float``: an output layer stays float (and is listed as a float layer)."""
        if self.recipe.keep_output_convs_float and (node.key in self.facts.output_layers
                                                    or self.is_model_output(node)):
            self.out.float_layers.append(node.key)
            return True
        return False

    def add_weight(self, node: Node) -> None:
        """The weight quantizer of a conv/linear layer, folding the BatchNorm that alone follows it."""
        module = self.facts.model.get_submodule(node.module)
        scheme: QuantScheme = self.rules.rule(node).weight
        axis = 1 if isinstance(module, _CONV_TRANSPOSE) else 0
        scheme = scheme.model_copy(update={"axis": axis}) if scheme.per_channel else scheme
        name = quantizer_name(node.key, "weight")
        channels = module.weight.shape[axis] if scheme.per_channel else None
        self.out.quantizers[name] = FakeQuantizer(scheme, name, channels=channels, dynamic=True)
        site = self.site(node)
        site.weight = name
        bn = self.folded_bn(node)
        if bn is not None:
            site.fold_bn = self.facts.module_path(bn)
            self.site(bn).identity = True
            self.site(bn).fold_into = node.key

    def quantize_missing_inputs(self, node: Node) -> None:
        """Inputs that arrive unquantized get a quantizer at this node (so the op reads int8)."""
        for i, edge in enumerate(node.inputs):
            if edge is not None and edge not in self.edge_q and i not in self.site(node).inputs:
                self.site(node).inputs[i] = self.new_act(node, quantizer_name(node.key, f"input{i}"))

    # ------------------------------------------------------------ finishing
    def merge_shared(self) -> None:
        """Rewrite every reference to a merged quantizer to its group's quantizer, and drop the merged ones."""
        f = self.groups.find
        for site in self.out.sites.values():
            site.inputs = {i: f(k) for i, k in site.inputs.items()}
            site.output, site.bias_from = f(site.output), f(site.bias_from)
        self.edge_q = {e: f(k) for e, k in self.edge_q.items()}
        self.out.quantizers = {k: q for k, q in self.out.quantizers.items() if f(k) == k}

    def drop_empty_sites(self) -> None:
        """Sites where nothing happens (a node visited but left float) are not part of the plan."""
        self.out.sites = {k: s for k, s in self.out.sites.items() if s != Site(s.kind)}
