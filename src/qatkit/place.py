"""Place: from a captured graph and a recipe, decide where quantizers go and which tensors share one.

Two placement policies, chosen by the recipe:

* ``all_activations`` (ONNX Runtime): every activation tensor carries a quantizer. Conv/linear/add/mul/cat/
  sigmoid outputs get their own; SiLU becomes ``x * q(sigmoid(x))``; shape-only ops (max-pool, nearest
  upsample, reshape, chunk/split) re-apply their input's quantizer, so input and output share one scale and
  ORT can run them on int8 directly; a BatchNorm after a conv is folded into it; conv biases go on the int32
  grid ``s_in * s_w``. Every node then reads DQ and writes Q, which ORT fuses into QLinear* kernels.
* ``compute_inputs`` (TensorRT): only conv/linear inputs and weights, one quantizer per tensor shared by all the
  conv/linear layers that read it; BatchNorm folded; output convs float if the recipe says so.

With ``share_concat_scales`` a concat's inputs and output become one quantizer (union-find over quantizer keys,
merged after placement). Per-layer rules (``qatkit.recipes.rules``) decide skip, float outputs and the schemes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .capture import Edge, Graph, Node
from .quant.quantizer import FakeQuantizer
from .quant.scheme import QuantScheme
from .recipes import Recipe
from .recipes.rules import Resolved, Rule, resolve
from .runtime import ROOT, Site

COMPUTE = ("conv", "linear")
NEW_SCALE = ("add", "mul", "cat", "sigmoid", "pool", "act")


@dataclass
class Placement:
    sites: dict[str, Site] = field(default_factory=dict)
    quantizers: dict[str, FakeQuantizer] = field(default_factory=dict)
    outputs: list[str | None] = field(default_factory=list)  # quantizer of each model output (None: float)


def _module_path(key: str) -> str:
    """The module a site belongs to: ``a.b@1/add#0`` -> ``a.b``."""
    return key.split("/")[0].split("@")[0]


class _Placer:
    def __init__(self, graph: Graph, recipe: Recipe, model: nn.Module) -> None:
        self.g, self.r, self.model = graph, recipe, model
        self.out = Placement()
        self.edge_q: dict[Edge, str] = {}  # activation quantizer carried by each tensor
        self.rules = [Rule(module_name_regex=p, skip=True) for p in recipe.skip] + list(recipe.rules)
        self._resolved: dict[str, Resolved] = {}
        self.relu_fused: set[Edge] = set()  # conv outputs left float because a following ReLU is quantized
        self.parent: dict[str, str] = {}  # union-find over quantizer keys that must share one scale
        self.output_edges = set(graph.outputs)

    # ---------------------------------------------------------------- helpers
    def rule(self, node: Node) -> Resolved:
        """Recipe settings for ``node`` after its matching rules (see qatkit.recipes.rules)."""
        if node.key not in self._resolved:
            path = "" if node.kind == "input" else node.module or _module_path(node.key)
            types = [type(m).__name__ for m in self._owners(path)]
            types += [node.kind, node.op] if node.module is None else []
            self._resolved[node.key] = resolve(self.rules, self.r.activation, self.r.weight, path, types)
        return self._resolved[node.key]

    def _owners(self, path: str) -> list[nn.Module]:
        """The root and each module along ``path`` (names the capture could not resolve are left out)."""
        parts, owners = path.split(".") if path else [], [self.model]
        for i in range(len(parts)):
            try:
                owners.append(self.model.get_submodule(".".join(parts[: i + 1])))
            except AttributeError:
                continue
        return owners

    def skipped(self, node: Node) -> bool:
        return self.rule(node).skip

    def site(self, node: Node) -> Site:
        return self.out.sites.setdefault(node.key, Site(node.kind))

    def new_act(self, node: Node, name: str) -> str:
        self.out.quantizers[name] = FakeQuantizer(self.rule(node).activation, name)
        return name

    def add_output(self, node: Node) -> None:
        """A new quantizer on ``node``'s output, unless a rule says its output stays float."""
        float_output = not self.r.quantize_model_outputs and self.is_model_output(node)
        if self.rule(node).quantize_output and not float_output:
            self.set_output(node, self.new_act(node, f"{node.key}/output"))

    def only_consumer(self, node: Node) -> Node | None:
        users = self.g.consumers((node.key, 0))
        return users[0][0] if len(users) == 1 and node.num_outputs == 1 else None

    def folded_bn(self, node: Node) -> Node | None:
        nxt = self.only_consumer(node)
        return nxt if nxt is not None and nxt.kind == "bn" and not self.skipped(nxt) else None

    def is_model_output(self, node: Node) -> bool:
        bn = self.folded_bn(node)
        return (node.key, 0) in self.output_edges or (bn is not None and (bn.key, 0) in self.output_edges)

    def add_weight(self, node: Node) -> None:
        module = self.model.get_submodule(node.module)
        scheme: QuantScheme = self.rule(node).weight
        axis = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
        scheme = scheme.model_copy(update={"axis": axis}) if scheme.per_channel else scheme
        name = f"{node.key}/weight"
        channels = module.weight.shape[axis] if scheme.per_channel else None
        self.out.quantizers[name] = FakeQuantizer(scheme, name, channels=channels, dynamic=True)
        site = self.site(node)
        site.weight = name
        bn = self.folded_bn(node)
        if bn is not None:
            site.fold_bn = bn.module
            self.site(bn).identity = True

    def quantize_missing_inputs(self, node: Node) -> None:
        """Inputs that arrive unquantized get a quantizer at this node (so the op reads int8)."""
        for i, edge in enumerate(node.inputs):
            if edge is not None and edge not in self.edge_q:
                self.site(node).inputs[i] = self.new_act(node, f"{node.key}/input{i}")

    def set_output(self, node: Node, q: str | None) -> None:
        if q is None or not self.rule(node).quantize_output:
            return
        self.site(node).output = q
        for i in range(node.num_outputs):
            self.edge_q[(node.key, i)] = q

    def find(self, key: str | None) -> str | None:
        while key is not None and self.parent.get(key, key) != key:
            key = self.parent[key]
        return key

    def share(self, keys: list[str]) -> None:
        """Make ``keys`` one quantizer (the first one's), e.g. a concat's inputs and output."""
        roots = [self.find(k) for k in keys]
        for r in roots[1:]:
            if r != roots[0]:
                self.parent[r] = roots[0]

    def merge_shared(self) -> None:
        """Rewrite every reference to a merged quantizer to its group's quantizer, and drop the merged ones."""
        f = self.find
        for site in self.out.sites.values():
            site.inputs = {i: f(k) for i, k in site.inputs.items()}
            site.output, site.bias_from = f(site.output), f(site.bias_from)
        self.edge_q = {e: f(k) for e, k in self.edge_q.items()}
        self.out.quantizers = {k: q for k, q in self.out.quantizers.items() if f(k) == k}

    # ---------------------------------------------------------------- policies
    def run(self) -> Placement:
        inputs = [n for n in self.g.nodes.values() if n.kind == "input"]
        if self.r.placement == "all_activations" and self.r.quantize_model_input and inputs:
            root = self.out.sites.setdefault(ROOT, Site("input"))
            for i, n in enumerate(inputs):
                q = root.inputs[i] = self.new_act(n, f"input{i}")
                self.edge_q[(n.key, 0)] = q
        for node in self.g.nodes.values():
            if node.kind == "input" or self.skipped(node):
                continue
            if self.r.placement == "all_activations":
                self.all_activations(node)
            else:
                self.compute_inputs(node)
        self.merge_shared()
        self.out.sites = {k: s for k, s in self.out.sites.items() if s != Site(s.kind)}
        self.out.outputs = [self.edge_q.get(e) if self.r.placement == "all_activations" else None
                            for e in self.g.outputs]
        return self.out

    def all_activations(self, node: Node) -> None:
        kind = node.kind
        first = node.inputs[0] if node.inputs else None
        if kind in COMPUTE and node.module is not None:
            if self.r.keep_output_convs_float and self.is_model_output(node):
                return
            self.quantize_missing_inputs(node)
            self.add_weight(node)
            site = self.site(node)
            site.bias_from = site.inputs.get(0) or self.edge_q.get(first)
            nxt = self.folded_bn(node) or node
            after = self.only_consumer(nxt)
            fused_relu = after is not None and after.kind == "relu" and not self.skipped(after)
            if fused_relu:  # conv+relu: only the relu output is quantized, ORT fuses the pair
                self.relu_fused.add((nxt.key, 0))
            else:
                self.add_output(node)
                if nxt is not node and (node.key, 0) in self.edge_q:
                    self.edge_q[(nxt.key, 0)] = self.edge_q[(node.key, 0)]
        elif kind == "bn" and self.site(node).identity:
            pass
        elif kind in ("silu", "relu") or kind in NEW_SCALE:
            if first not in self.relu_fused:
                self.quantize_missing_inputs(node)
            if kind == "silu" and self.r.silu_to_relu:
                self.site(node).relu = True  # only functional F.silu is left: modules were swapped
            elif kind == "silu":
                self.site(node).sigmoid = self.new_act(node, f"{node.key}/sigmoid")
            self.add_output(node)
            if kind == "cat" and self.r.share_concat_scales and (node.key, 0) in self.edge_q:
                # one scale in and out: ORT's QLinearConcat then copies instead of requantizing
                self.share([self.edge_q[(node.key, 0)]] + [self.edge_q[e] for e in node.inputs if e in self.edge_q])
        elif kind == "shape" and first in self.edge_q:
            self.set_output(node, self.edge_q[first])

    def compute_inputs(self, node: Node) -> None:
        if node.kind not in COMPUTE or node.module is None or not node.inputs:
            return
        if self.r.keep_output_convs_float and self.is_model_output(node):
            return
        edge = node.inputs[0]
        q = self.edge_q.get(edge)
        if q is None:
            q = self.new_act(node, f"{edge[0]}/output{edge[1]}" if edge else f"{node.key}/input0")
            if edge is not None:
                self.edge_q[edge] = q
        self.site(node).inputs[0] = q
        self.add_weight(node)


def place(graph: Graph, recipe: Recipe, model: nn.Module) -> Placement:
    """Quantizers and sites for ``model`` under ``recipe`` (see the module docstring for the policies)."""
    return _Placer(graph, recipe, model).run()
