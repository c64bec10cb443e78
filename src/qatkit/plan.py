"""The site plan: what to do at each call site of a model, and the grammar of the names involved.

Placement (:mod:`qatkit.placement`) writes the plan, the run time (:mod:`qatkit.runtime`) executes it, and
checkpoints store it; this module depends on neither.

Site keys name the call sites :class:`qatkit.tracing.CallTracker` sees during ``forward``:

* a module call: ``<module path>[@<call>]``, e.g. ``stage1.0.conv``; ``@1``, ``@2``... count repeated calls of one
  module within a forward (the first call has no suffix). The root module's call is :data:`ROOT` (``""``).
* a functional op in a module's ``forward``: ``<module call>/<op name>#<n>``, e.g. ``stage1.0/add#0``, the ``n``-th
  call of that op name in that module call.

Quantizer names are ``<owner>/<role>`` (``stage1.0.conv/weight``, ``stage1.0/add#0/output``), where the owner is a
site key or module path, except the model inputs' quantizers, ``input0``, ``input1``...

Example:
    >>> parse_key("head.cv2@1/cat#0")
    Key(module='head.cv2', call=1, op='cat', index=0)
    >>> str(parse_key("head.cv2@1/cat#0"))
    'head.cv2@1/cat#0'
    >>> quantizer_owner("stage1.0/add#0/output")
    'stage1.0/add#0'
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

ROOT = ""  # site key of the root module call (its inputs are the model inputs)
_GRAMMAR = "module[@call] or module[@call]/op#n, e.g. 'stage1.0.conv', 'stage1.0@1', 'stage1.0/add#0'"


@dataclass
class Site:
    """What to do at one call site; quantizers are referred to by name (``QuantState.quantizers``)."""

    kind: str
    inputs: dict[int, str] = field(default_factory=dict)  # tensor-input index -> quantizer
    output: str | None = None  # applied to every floating tensor output
    weight: str | None = None
    bias_from: str | None = None  # input quantizer whose scale x weight scale is the int32 bias scale
    fold_bn: str | None = None  # BatchNorm module folded into this conv
    identity: bool = False  # a BatchNorm folded away: returns its input (runs for real while BN is live)
    fold_into: str | None = None  # the conv site this BatchNorm is folded into
    sigmoid: str | None = None  # SiLU computed as x * q(sigmoid(x))
    relu: bool = False  # a functional SiLU computed as ReLU (recipe silu_to_relu)


def site_table(sites: dict[str, Site]) -> dict[str, dict]:
    """The plan as plain data (key -> Site fields), as checkpoints store and compare it."""
    return {k: asdict(s) for k, s in sites.items()}


@dataclass(frozen=True)
class Key:
    """A parsed site key: ``module[@call]`` (``op``/``index`` None) or ``module[@call]/op#index``."""

    module: str
    call: int = 0
    op: str | None = None
    index: int | None = None

    @property
    def scope(self) -> str:
        """The module call: ``module`` or ``module@call``."""
        return self.module if self.call == 0 else f"{self.module}@{self.call}"

    def __str__(self) -> str:
        return self.scope if self.op is None else f"{self.scope}/{self.op}#{self.index}"


def parse_key(key: str) -> Key:
    """Split a site key into module path, call number, op name and op index.

    A module path or a model-input node key (``input#0``, which has no ``/``) parses as a module call; an ``@``
    not followed by a number is part of the module name.

    Raises:
        ValueError: the part after ``/`` is not ``op#n`` (not a key qatkit made: keys come from capture/inspect).
    """
    scope, slash, op = key.partition("/")
    module, at, call = scope.rpartition("@")
    if not (at and call.isdigit()):
        module, call = scope, "0"
    if not slash:
        return Key(module, int(call))
    name, hash_, index = op.rpartition("#")
    if not (hash_ and name and index.isdigit()):
        raise ValueError(f"site key {key!r}: the op after '/' must be name#n ({_GRAMMAR}); "
                         "use a key as `qatkit inspect` lists it")
    return Key(module, int(call), name, int(index))


def call_key(module: str, call: int) -> str:
    """The site key of the ``call``-th call (from 0) of ``module`` within one forward."""
    return str(Key(module, call))


def op_key(scope: str, op: str, index: int) -> str:
    """The site key of the ``index``-th ``op`` call (from 0) inside the module call ``scope``."""
    return f"{scope}/{op}#{index}"


def module_of(key: str) -> str:
    """The module a layer or op key belongs to: ``a.b@1/add#0`` -> ``a.b``; a module path is its own."""
    return parse_key(key).module


def within(path: str, module: str) -> bool:
    """Whether a module path or site key lies in ``module``'s subtree (``a.b``, ``a.b.c``, ``a.b/add#0``).

    Op keys of a repeated call (``a.b@1/add#0``) lie in ``a.b@1``, not in ``a.b``.
    """
    return path == module or path.startswith(module + ".") or path.startswith(module + "/")


def input_key(i: int) -> str:
    """Node key of the ``i``-th model input in a captured graph."""
    return f"input#{i}"


def quantizer_name(owner: str, role: str) -> str:
    """``<owner>/<role>``: e.g. ``stage1.0.conv/weight``, ``stage1.0/add#0/output``, ``head/entry0``."""
    return f"{owner}/{role}"


def input_quantizer(i: int) -> str:
    """Name of the quantizer of the ``i``-th model input."""
    return f"input{i}"


def is_input_quantizer(name: str) -> bool:
    """Whether ``name`` (a quantizer name or owner) looks like a model input's quantizer (``input0``...)."""
    return name.startswith("input") and "/" not in name and "." not in name


def quantizer_owner(name: str) -> str:
    """The site key or module path a quantizer belongs to (a model input's quantizer is its own owner)."""
    return name.rsplit("/", 1)[0] if "/" in name else name


def slot(name: str) -> str:
    """Where quantizer ``name`` is stored in ``QuantState.quantizers`` (an ``nn.ModuleDict``: no dots in keys)."""
    return name.replace(".", ":")
