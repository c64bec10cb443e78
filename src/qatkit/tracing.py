"""Naming every op call site of a model's forward, without touching the model's code.

A ``TorchFunctionMode`` sees every torch function and Tensor method called during ``forward`` (``x + y``,
``torch.cat``, ``chunk``, ``F.interpolate``...), and forward hooks on every submodule keep a stack of the module
calls in progress. Together they give each op a stable key, ``<module path>[@call]/<op name>#<n>``, the same at
capture time and at run time, which is what lets qatkit attach quantizers to functional ops of any ``nn.Module``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .plan import parse_key

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
RELU_LIKE = (nn.ReLU, nn.ReLU6)
ACT_TYPES = (nn.SiLU, nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.GELU, nn.Tanh,
             nn.Mish, nn.ELU, nn.PReLU)
PASS_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten,
              nn.AdaptiveMaxPool2d)
POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
LEAF_TYPES = CONV_TYPES + CONVT_TYPES + (nn.Linear,) + BN_TYPES + ACT_TYPES + PASS_TYPES + POOL_TYPES + (
    nn.Upsample, nn.Softmax, nn.LayerNorm, nn.GroupNorm, nn.Embedding)

# Functional ops by name (torch function, Tensor method or dunder). "shape" ops move values without changing them,
# so they pass their input's scale through; "arith" ops make new values and get their own output quantizer.
_FUNC_KINDS = {
    "add": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add", "add_": "add",
    "sub": "add", "__sub__": "add", "__rsub__": "add", "__isub__": "add",
    "mul": "mul", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "mul_": "mul",
    "cat": "cat", "concat": "cat", "concatenate": "cat",
    "sigmoid": "sigmoid", "silu": "silu", "relu": "relu", "relu_": "relu",
    "max_pool1d": "shape", "max_pool2d": "shape", "_max_pool2d": "shape", "max_pool3d": "shape",
    "avg_pool2d": "pool", "adaptive_avg_pool2d": "pool", "mean": "pool",
    "view": "shape", "reshape": "shape", "flatten": "shape", "permute": "shape", "transpose": "shape",
    "chunk": "shape", "split": "shape", "__getitem__": "shape", "contiguous": "shape", "squeeze": "shape",
    "unsqueeze": "shape", "unbind": "shape", "pixel_shuffle": "shape",
    "conv2d": "conv", "linear": "linear", "batch_norm": "bn",
    "matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "bmm": "matmul",
}


def module_kind(module: nn.Module) -> str:
    """Kind of a leaf module: conv, convt, linear, bn, silu, relu, act, shape, pool, upsample, other."""
    if isinstance(module, CONV_TYPES):
        return "conv"
    if isinstance(module, CONVT_TYPES):
        return "convt"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, BN_TYPES):
        return "bn"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, RELU_LIKE):
        return "relu"
    if isinstance(module, ACT_TYPES):
        return "act"
    if isinstance(module, PASS_TYPES):
        return "shape"
    if isinstance(module, POOL_TYPES):
        return "pool"
    if isinstance(module, nn.Upsample):
        return "shape" if module.mode == "nearest" else "other"
    return "other"


def func_name(func) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return "__get__" if name == "__get__" else name


def func_kind(func, kwargs: dict | None) -> str:
    """Kind of a functional op; ``interpolate`` is a value-preserving "shape" op only in nearest mode."""
    name = func_name(func)
    if name == "interpolate":
        return "shape" if (kwargs or {}).get("mode", "nearest") == "nearest" else "other"
    if func is F.silu:
        return "silu"
    return _FUNC_KINDS.get(name, "other")


def is_leaf(module: nn.Module) -> bool:
    """Known layer types are leaves, unless they hold submodules (timm's BatchNormAct2d: BN + its activation)."""
    return isinstance(module, LEAF_TYPES) and not module._modules


class Frame:
    """One module call in progress: its key and a counter per op name for the functional ops it runs.

    ``site`` is the plan's site for this call, looked up once by the run-time hooks (None during capture or where
    the plan has none).
    """

    __slots__ = ("key", "module", "leaf", "counts", "site", "on_grid")

    def __init__(self, key: str, module: nn.Module, leaf: bool) -> None:
        self.key, self.module, self.leaf = key, module, leaf
        self.counts: dict[str, int] = {}
        self.site = None
        self.on_grid = None  # the run time's: this layer's inputs, if on its output quantizer's grid


class CallTracker:
    """Keeps the stack of module calls of one root forward and hands out stable keys.

    Per call it does a few dict lookups: leaf-ness is cached per module type (plus the module's live ``_modules``
    check), a child's name in its parent per (parent, child) pair, re-checked against the parent's ``_modules``.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._names_of = id(root)
        self.names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
        self.stack: list[Frame] = []
        self.calls: dict[str, int] = {}
        self._leaf_type: dict[type, bool] = {}
        self._child: dict[tuple[int, int], str] = {}

    def reset(self) -> None:
        self.stack.clear()
        self.calls.clear()

    def _child_name(self, parent: nn.Module, module: nn.Module) -> str | None:
        """The first name under which ``parent`` holds ``module`` (None: not its child)."""
        children = parent._modules
        ck = (id(parent), id(module))
        name = self._child.get(ck)
        if name is not None and children.get(name) is module:
            return name
        for name, child in children.items():
            if child is module:
                self._child[ck] = name
                return name
        return None

    def _path(self, module: nn.Module) -> str:
        """Path of ``module`` as seen from its caller: a shared module gets the name its parent uses."""
        if self.stack:
            parent = self.stack[-1]
            name = self._child_name(parent.module, module)
            if name is not None:
                key = parent.key
                scope = parse_key(key).module if ("@" in key or "/" in key) else key
                return f"{scope}.{name}".lstrip(".")
        if self._names_of != id(self.root):  # a deep copy of the model (an EMA): its modules have other ids
            self._names_of = id(self.root)
            self.names = {id(m): n for n, m in self.root.named_modules(remove_duplicate=False)}
        return self.names.get(id(module), type(module).__name__)

    def push(self, module: nn.Module) -> Frame:
        path = self._path(module) if self.stack else ""
        n = self.calls.get(path, 0)
        self.calls[path] = n + 1
        key = path if n == 0 else f"{path}@{n}"  # call_key(path, n)
        leaf = self._leaf_type.get(type(module))
        if leaf is None:
            leaf = self._leaf_type[type(module)] = isinstance(module, LEAF_TYPES)
        frame = Frame(key, module, leaf and not module._modules)
        self.stack.append(frame)
        return frame

    def pop(self) -> Frame:
        return self.stack.pop()

    @property
    def top(self) -> Frame | None:
        return self.stack[-1] if self.stack else None

    def op_key(self, func) -> str:
        frame = self.stack[-1]
        name = func_name(func)
        counts = frame.counts
        n = counts.get(name, 0)
        counts[name] = n + 1
        return f"{frame.key}/{name}#{n}"  # op_key(frame.key, name, n)
