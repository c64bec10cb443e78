"""Place: from a captured graph and a recipe, decide where quantizers go and which tensors share one.

Two placement policies, chosen by the recipe:

* ``all_activations`` (ONNX Runtime): every activation tensor carries a quantizer. Conv/linear/add/mul/cat/
  sigmoid outputs get their own; SiLU becomes ``x * q(sigmoid(x))``; shape-only ops (max-pool, nearest
  upsample, reshape, chunk/split) re-apply their input's quantizer, so input and output share one scale and
  ORT can run them on int8 directly; a BatchNorm after a conv is folded into it; conv biases go on the int32
  grid ``s_in * s_w``. Every node then reads DQ and writes Q, which ORT fuses into QLinear* kernels.
* ``compute_inputs`` (TensorRT explicit Q/DQ): conv/linear inputs and weights, max-pool inputs, and residual adds
  (seed 004: the add input that is not the fusing conv's output gets Q/DQ, so TensorRT fuses conv+add in int8).
  One quantizer per *value*: a tensor and everything shape ops make of it (max-pool, nearest upsample, reshape,
  split) share one, so a max-pool's input and output have one scale. BatchNorm folded.

Shared by both: with ``share_concat_scales`` a concat's inputs and output become one quantizer (union-find over
quantizer keys, merged after placement), so neither TensorRT nor ORT has to requantize around a concat. The head
decode (``keep_head_decode_float``: every op after the last layer with trainable weights, e.g. YOLO's DFL, anchor
arithmetic and box decode) stays float, and ``keep_output_convs_float`` keeps those last layers float. Per-layer
rules (``qatkit.recipes.rules``) decide skip, boundary input/output quantization and the schemes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .capture import Edge, Graph, Node
from .plan import ROOT, Site, module_of, within
from .quant.quantizer import FakeQuantizer
from .quant.scheme import QuantScheme
from .recipes import Recipe
from .recipes.rules import Resolved, Rule, boundary, resolve
from .recipes.selectors import check_selectors

COMPUTE = ("conv", "linear")
NEW_SCALE = ("add", "mul", "cat", "sigmoid", "pool", "act", "matmul")


@dataclass
class Placement:
    sites: dict[str, Site] = field(default_factory=dict)
    quantizers: dict[str, FakeQuantizer] = field(default_factory=dict)
    outputs: list[str | None] = field(default_factory=list)  # quantizer of each model output (None: float)
    float_layers: list[str] = field(default_factory=list)  # conv/linear left float on purpose (recipe or rule)


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
        self.entry_q: dict[Edge, str] = {}  # quantizers at module boundaries (rule quantize_input)
        self.users: dict[Edge, list[Node]] = {}
        for n in graph.nodes.values():
            for e in n.inputs:
                if e is not None:
                    self.users.setdefault(e, []).append(n)
        self._find_head()

    def _find_head(self) -> None:
        """Output layers (trainable conv/linear with no trainable layer after them) and the decode tail after them.

        Trainable = has weights that require grad (YOLO's DFL conv has fixed weights: it is decode arithmetic).
        If no layer requires grad (a frozen model), every conv/linear counts as trainable.
        """
        if self.g.fallback:  # no dataflow: nothing is known to come after anything
            self.output_layers, self.tail = set(), set()
            return
        compute = [n for n in self.g.nodes.values() if n.kind in COMPUTE and n.module is not None]
        trainable = {n.key for n in compute
                     if any(p.requires_grad for p in self.model.get_submodule(n.module).parameters())}
        trainable = trainable or {n.key for n in compute}
        below: dict[str, bool] = {}  # a trainable layer reads this node's output, directly or further down
        for n in reversed(list(self.g.nodes.values())):
            below[n.key] = any(u.key in trainable or below.get(u.key, False)
                               for i in range(n.num_outputs) for u in self.users.get((n.key, i), []))
        self.output_layers = {k for k in trainable if not below[k]}
        self.tail = {n.key for n in self.g.nodes.values() if self.r.keep_head_decode_float and n.kind != "input"
                     and n.key not in trainable and not below[n.key]}

    # ---------------------------------------------------------------- helpers
    def rule(self, node: Node) -> Resolved:
        """Recipe settings for ``node`` after its matching rules (see qatkit.recipes.rules)."""
        if node.key not in self._resolved:
            path = "" if node.kind == "input" else node.module or node.key  # an op is named by its key
            types = [type(m).__name__ for m in self._owners(module_of(path))]
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
        return node.key in self.tail or self.rule(node).skip

    def _path(self, node: Node) -> str:
        return node.module or module_of(node.key)

    def _boundaries(self, node: Node) -> list[tuple[str, list[str]]]:
        """(module path, own type names) of the node itself and every module that contains it, innermost first."""
        path = self._path(node)
        own = [(path, [type(self._owners(path)[-1]).__name__])] if node.module else [(node.key, [node.kind, node.op])]
        parts = path.split(".") if path else []
        outer = [".".join(parts[:i]) for i in range(len(parts) - (1 if node.module else 0), 0, -1)]
        return own + [(p, [type(self._owners(p)[-1]).__name__]) for p in outer]

    def output_float(self, node: Node) -> bool:
        """A rule's ``quantize_output: false`` on a module this node's output leaves, or float model outputs."""
        if not self.r.quantize_model_outputs and (node.key in self.output_layers or self.is_model_output(node)):
            return True
        last = self.folded_bn(node) or node
        edges = [(last.key, i) for i in range(last.num_outputs)]
        users = [self._path(u) if u.module else u.key for e in edges for u in self.users.get(e, [])]
        for module, types in self._boundaries(node):
            leaves = any(e in self.output_edges for e in edges) or any(not within(u, module) for u in users)
            if leaves and not boundary(self.rules, module, types)[1]:
                return True
        return False

    def quantize_entries(self, node: Node) -> None:
        """Rule ``quantize_input``: tensors entering a module from outside are quantized at its boundary."""
        values = self.r.placement == "compute_inputs"
        for i, edge in enumerate(node.inputs):
            if edge is None or (not values and edge in self.edge_q):
                continue  # all_activations: the producer already quantized it
            src = self.g.nodes[edge[0]]
            src_path = "" if src.kind == "input" else (src.module or src.key)
            for module, types in self._boundaries(node):
                if within(src_path, module) or not boundary(self.rules, module, types)[0]:
                    continue
                if values:
                    self.value_q(node, i)  # the value's one quantizer, applied at this boundary too
                else:
                    if edge not in self.entry_q:
                        self.entry_q[edge] = self.new_act(node, f"{module}/entry{len(self.entry_q)}")
                    self.site(node).inputs[i] = self.entry_q[edge]
                break

    def site(self, node: Node) -> Site:
        return self.out.sites.setdefault(node.key, Site(node.kind))

    def new_act(self, node: Node, name: str) -> str:
        self.out.quantizers[name] = FakeQuantizer(self.rule(node).activation, name)
        return name

    def add_output(self, node: Node) -> None:
        """A new quantizer on ``node``'s output, unless a rule says its output stays float."""
        if not self.output_float(node):
            self.set_output(node, self.new_act(node, f"{node.key}/output"))

    def only_consumer(self, node: Node) -> Node | None:
        users = self.users.get((node.key, 0), [])
        return users[0] if len(users) == 1 and node.num_outputs == 1 else None

    def folded_bn(self, node: Node) -> Node | None:
        """The BatchNorm (module, or F.batch_norm inside a BN subclass) that alone reads this conv's output."""
        nxt = self.only_consumer(node)
        if nxt is None or nxt.kind != "bn" or self.skipped(nxt):
            return None
        return nxt if isinstance(self._owners(self._path(nxt))[-1], nn.modules.batchnorm._BatchNorm) else None

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
            site.fold_bn = self._path(bn)
            self.site(bn).identity = True
            self.site(bn).fold_into = node.key

    def quantize_missing_inputs(self, node: Node) -> None:
        """Inputs that arrive unquantized get a quantizer at this node (so the op reads int8)."""
        for i, edge in enumerate(node.inputs):
            if edge is not None and edge not in self.edge_q and i not in self.site(node).inputs:
                self.site(node).inputs[i] = self.new_act(node, f"{node.key}/input{i}")

    def set_output(self, node: Node, q: str | None) -> None:
        if q is None or self.output_float(node):
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
        if self.r.placement == "all_activations" and self.r.quantize_model_input and inputs and not self.g.fallback:
            root = self.out.sites.setdefault(ROOT, Site("input"))
            for i, n in enumerate(inputs):
                q = root.inputs[i] = self.new_act(n, f"input{i}")
                self.edge_q[(n.key, 0)] = q
        for node in self.g.nodes.values():
            if node.kind == "input":
                continue
            if self.skipped(node):
                if node.kind in COMPUTE and node.module is not None:
                    self.out.float_layers.append(node.key)
                continue
            self.quantize_entries(node)
            if self.r.placement == "all_activations" and not self.g.fallback:
                self.all_activations(node)
            else:
                self.compute_inputs(node)
        if self.r.share_concat_scales:
            self.share_concats()
        self.merge_shared()
        self.out.sites = {k: s for k, s in self.out.sites.items() if s != Site(s.kind)}
        self.out.outputs = [self.edge_q.get(e) if self.r.placement == "all_activations" else None
                            for e in self.g.outputs]  # the fallback graph has no outputs
        return self.out

    def float_output_layer(self, node: Node) -> bool:
        if self.r.keep_output_convs_float and (node.key in self.output_layers or self.is_model_output(node)):
            self.out.float_layers.append(node.key)
            return True
        return False

    def all_activations(self, node: Node) -> None:
        kind = node.kind
        first = node.inputs[0] if node.inputs else None
        if kind in COMPUTE and node.module is not None:
            if self.float_output_layer(node):
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
        elif kind == "shape" and first in self.edge_q:
            self.set_output(node, self.edge_q[first])

    # compute_inputs: quantizers belong to values (a tensor and what shape ops make of it), see value_q
    def origin(self, edge: Edge | None) -> Edge | None:
        """The tensor ``edge`` is a view/pooled/upsampled copy of (walking back through shape ops)."""
        while edge is not None:
            node = self.g.nodes[edge[0]]
            if node.kind != "shape" or not node.inputs or node.inputs[0] is None:
                return edge
            edge = node.inputs[0]
        return edge

    def value_q(self, node: Node, i: int) -> str:
        """The one quantizer of the value read by ``node``'s input ``i``, applied at this node."""
        edge = self.origin(node.inputs[i])
        q = self.edge_q.get(edge) if edge is not None else None
        if q is None:
            q = self.new_act(node, f"{edge[0]}/output{edge[1]}" if edge else f"{node.key}/input{i}")
            if edge is not None:
                self.edge_q[edge] = q
        self.site(node).inputs[i] = q
        return q

    def conv_output(self, edge: Edge) -> bool:
        node = self.g.nodes[edge[0]]
        if node.kind == "bn" and node.inputs and node.inputs[0] is not None:
            node = self.g.nodes[node.inputs[0][0]]
        return node.kind in COMPUTE and node.module is not None and not self.skipped(node)

    def compute_inputs(self, node: Node) -> None:
        if node.kind in COMPUTE and node.module is not None and node.inputs:
            if not self.float_output_layer(node):
                self.value_q(node, 0)
                self.add_weight(node)
        elif node.kind == "shape" and "maxpool" in node.op.lower().replace("_", "") and node.inputs:
            self.value_q(node, 0)  # TensorRT runs max-pool in int8 on one scale in and out
        elif node.kind == "matmul":  # activation x activation: both operands in int8
            for i, e in enumerate(node.inputs):
                if e is not None:
                    self.value_q(node, i)
        elif node.kind == "add" and len([e for e in node.inputs if e is not None]) > 1:
            # seed 004: TensorRT fuses conv + residual add when the other input carries Q/DQ. The conv executed
            # last is the fusing one; with no conv input, both inputs are quantized (the add runs in int8).
            convs = [i for i, e in enumerate(node.inputs) if e is not None and self.conv_output(e)]
            fused = max(convs, key=lambda i: list(self.g.nodes).index(node.inputs[i][0])) if convs else None
            for i, e in enumerate(node.inputs):
                if e is not None and i != fused:
                    self.value_q(node, i)

    def share_concats(self) -> None:
        """A concat's inputs and output on one quantizer (values traced through shape ops under compute_inputs)."""
        for node in self.g.nodes.values():
            if node.kind != "cat" or self.skipped(node):
                continue
            edges = [(node.key, 0)] + [e for e in node.inputs if e is not None]
            if self.r.placement == "compute_inputs":
                edges = [self.origin(e) for e in edges]
            keys = [self.edge_q[e] for e in edges if e in self.edge_q]
            # all_activations: a float concat output (a rule) dequantizes its inputs anyway, nothing to share
            if len(keys) > 1 and (edges[0] in self.edge_q or self.r.placement == "compute_inputs"):
                self.share(keys)


def place(graph: Graph, recipe: Recipe, model: nn.Module) -> Placement:
    """Quantizers and sites for ``model`` under ``recipe`` (see the module docstring for the policies).

    Raises:
        RecipeError: a ``skip`` entry or rule selector matches nothing in ``model`` (qatkit.recipes.selectors).
    """
    check_selectors(recipe, graph, model)
    return _Placer(graph, recipe, model).run()
