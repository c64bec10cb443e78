"""Executing one site: its quantizers applied to the tensors of one call (inputs, outputs, weight and bias)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..bn_fold import bn_scale, fold_bias, unscale_output
from ..errors import QatkitError
from ..plan import Site
from ..quant import kernels
from ..quant.silu_kernel import quantized_silu
from ..quant.quantizer import FakeQuantizer, quantize_bias
from ..tracing import func_name
from .layer_cache import LayerCache
from .on_grid import VALUE_PRESERVING, OnGrid

if TYPE_CHECKING:
    from .state import QuantState

_WEIGHT_OPS = {"conv1d", "conv2d", "conv3d", "linear"}
LIVE_BN_COMPILE = (
    "torch.compile of a quantized model training with BatchNorm live (BN in train mode, not frozen): on torch 2.14, "
    "AOTAutograd recomputes the BN fold from running_var in the backward after BN has updated it in place, and "
    "inductor then computes wrong gradients without an error; call qatkit.freeze(model, bn=True) before training "
    "the compiled model (qatkit's default QAT schedule), or train this phase without torch.compile"
)


def _quantizing(*quantizers: FakeQuantizer) -> bool:
    """Whether all of these quantize now (fake-quant on and a scale). While calibration observes (fake-quant off) or a
    sensitivity sweep keeps a layer float, its bias stays float too: rounding it to ``s_input * s_weight`` with an
    input scale not yet calibrated (1.0) would shift what the observers see."""
    return all(q.fake_quant_on and q.is_calibrated for q in quantizers)


SCALARS = (int, float, bool, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device, torch.memory_format,
            torch.layout)  # pytree leaves that are never tensors
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def flat_tensors(args) -> list | None:
    """The leaves of a call's positional arguments, as ``tree_flatten`` orders them, where they are tensors,
    scalars and plain lists/tuples of tensors; None for anything else (the caller then uses ``tree_flatten``)."""
    leaves = []
    for a in args:
        t = type(a)
        if t in _PLAIN_TENSORS or t in SCALARS:
            leaves.append(a)
        elif t is list or t is tuple:
            for b in a:
                if type(b) not in _PLAIN_TENSORS:
                    return None
            leaves.extend(a)
        else:
            return None
    return leaves


def _quantize_flat(run: "SiteExecutor", site: Site, tree):
    """:meth:`SiteExecutor.quantize_inputs` without pytree for the common calls: a tuple of plain arguments (module
    inputs) or ``(args, kwargs)`` whose kwargs hold scalars only. None where the tree has another shape."""
    if type(tree) is not tuple:
        return None
    if len(tree) == 2 and type(tree[0]) is tuple and type(tree[1]) is dict:  # (args, kwargs) of a functional op
        args, kwargs = tree
        for v in kwargs.values():
            if type(v) not in SCALARS:
                return None
        new = _quantize_flat(run, site, args)
        return None if new is None else (new, kwargs)
    if flat_tensors(tree) is None:
        return None
    inputs = site.inputs
    out = []
    idx = 0
    for a in tree:
        t = type(a)
        if t in _PLAIN_TENSORS:
            key = inputs.get(idx)
            out.append(run.act(key, a) if key is not None and a.is_floating_point() else a)
            idx += 1
        elif t is list or t is tuple:
            items = []
            for b in a:
                key = inputs.get(idx)
                items.append(run.act(key, b) if key is not None and b.is_floating_point() else b)
                idx += 1
            out.append(t(items))
        else:
            out.append(a)
    return tuple(out)


@torch.compiler.disable
def _refuse_live_bn_compile() -> None:
    """Raised from outside the graph: dynamo runs a disabled function eagerly, so the error reaches the user
    (a ``raise`` in traced code would only split the graph and run that code eagerly)."""
    raise QatkitError(LIVE_BN_COMPILE)


_METADATA_CALLS = frozenset({"dim", "size", "numel", "nelement", "ndimension", "stride", "is_floating_point",
                             "is_complex", "is_contiguous", "element_size", "get_device", "__len__"})
_METADATA_PROPERTIES = frozenset({"shape", "dtype", "device", "requires_grad", "ndim", "layout", "is_cuda", "is_cpu",
                                  "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_meta", "names"})


def _eager_without_graph() -> bool:
    """An eager forward that builds no autograd graph and is not traced (torch.compile, ONNX export): what the
    run time then computes is used once, so it may reuse memory and kept layers."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def _views_of(out, storages: set[int]) -> bool:
    """Whether every floating tensor of ``out`` (a tensor, or a list/tuple of them) lies in one of ``storages``."""
    if type(out) in (list, tuple):
        return all(_views_of(t, storages) for t in out)
    return not (isinstance(out, torch.Tensor) and out.is_floating_point()) or (
        out.untyped_storage().data_ptr() in storages)


def _metadata_only(func: Callable) -> bool:
    """Whether a call reads only a tensor's metadata (its shape, dtype, device...), never its values."""
    name = getattr(func, "__name__", None)
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) in _METADATA_PROPERTIES
    return name in _METADATA_CALLS


class _Deferred:
    """A conv output that :meth:`SiteExecutor.defer_output` left raw: its quantizer, the SiLU site that applies it,
    whether that SiLU has, and the quantized value made for any other reader."""

    __slots__ = ("raw", "key", "silu", "consumed", "quantized")

    def __init__(self, raw: torch.Tensor, key: str, silu: Site | None) -> None:
        self.raw, self.key, self.silu = raw, key, silu
        self.consumed = False
        self.quantized: torch.Tensor | None = None


class SiteExecutor:
    """Applies sites of ``state``'s plan with ``state``'s quantizers; no knowledge of hooks or call tracking.

    Example usage::

        run = SiteExecutor(state)
        args = run.quantize_inputs(site, args)         # each floating tensor input through its quantizer
        out = run.quantize_output(site, func(*args))
    """

    def __init__(self, state: QuantState) -> None:
        self.state = state
        self._raw: dict[int, _Deferred] = {}  # conv outputs left raw for their SiLU (defer_output), by id
        self.grid = OnGrid()  # fake-quant outputs (and values moved from them) of this forward
        self.layers = LayerCache()  # quantized weights and biases between forwards without autograd (kept_layers)

    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Apply an activation quantizer; ``state.tap`` (set by :func:`qatkit.verify`) may observe or replace it.
        A tensor already on this quantizer's grid (:mod:`qatkit.runtime.on_grid`) is returned as it is; in
        calibration (observing, fake-quant off), one it has observed in this forward, which is not counted twice."""
        q = self.state.q(name)
        if self.state.tap is not None:
            return self.state.tap(q, q(x))
        if torch.compiler.is_compiling():
            return q(x)
        if self.grid and self.grid.holds(x, q):
            return x
        y = q(x)
        if q.plain() or (y is x and q.observer_enabled):
            self.grid.add(y, q)
        return y

    def kept_on_grid(self, site: Site, args) -> list[torch.Tensor] | None:
        """The floating tensors ``site`` reads, if it only moves values (a ``shape`` or ``cat`` op) and they are all
        on the grid of its output quantizer already: then so are its outputs, and :meth:`quantize_output` need not
        apply that quantizer (the result would be the same, bit for bit). None otherwise."""
        if (site.kind not in VALUE_PRESERVING or site.output is None or not self.grid or self.state.tap is not None
                or torch.compiler.is_compiling()):
            return None
        q = self.state.q(site.output)
        leaves = flat_tensors(args)
        if leaves is None:
            leaves = tree_flatten(args)[0]
        tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return tensors if tensors and all(self.grid.holds(t, q) for t in tensors) else None

    def quantize_inputs(self, site: Site, tree):
        """The site's input quantizers on the floating tensors of ``tree``, counted in flattening order."""
        fast = _quantize_flat(self, site, tree)
        if fast is not None:
            return fast
        leaves, spec = tree_flatten(tree)
        idx = 0
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                key = site.inputs.get(idx)
                if key is not None and leaf.is_floating_point():
                    leaves[i] = self.act(key, leaf)
                idx += 1
        return tree_unflatten(leaves, spec)

    def quantize_output(self, site: Site, out, on_grid: list[torch.Tensor] | None = None):
        """The site's output quantizer; while BN is live, a conv's moves to the output of its BatchNorm.
        ``on_grid`` (:meth:`kept_on_grid` of the site's inputs): the outputs are on its grid already, and are
        returned as they are, except that a view of an input becomes a copy (a fake-quant output is a new tensor:
        an in-place change of it must not reach the input). In calibration (fake-quant off, ``on_grid`` observed
        by the quantizer in this forward), a concat or a view of them is not observed again, while a max-pool or
        upsample output, a tensor of its own, is (:mod:`qatkit.runtime.on_grid`)."""
        if on_grid is not None:
            q, inputs = self.state.q(site.output), {t.untyped_storage().data_ptr() for t in on_grid}
            if q.fake_quant_on or site.kind == "cat" or _views_of(out, inputs):
                return self._kept(q, out, inputs)
        key = site.output
        if self.state.bn_live and (site.fold_bn is not None or site.fold_into is not None):
            key = None if site.fold_bn is not None else self.state.sites[site.fold_into].output
        if key is None:
            return out
        if type(out) in _PLAIN_TENSORS:  # tree_map's one leaf, without pytree
            return self.act(key, out) if out.is_floating_point() else out
        return tree_map(lambda t: self.act(key, t) if isinstance(t, torch.Tensor) and t.is_floating_point()
                        else t, out)

    def _kept(self, q: FakeQuantizer, out, inputs: set[int]):
        """``out`` (a tensor or a tree of them) as quantizer ``q``'s output: views of ``inputs`` copied, where ``q``
        would have made a new tensor (fake-quant on; off, it returns its input itself)."""
        if type(out) in (list, tuple):
            return type(out)(self._kept(q, t, inputs) for t in out)
        if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
            return out
        if q.fake_quant_on and out.untyped_storage().data_ptr() in inputs:
            out = out.clone()
        self.grid.add(out, q)
        return out

    def defer_output(self, site: Site, out, key: str) -> bool:
        """Whether conv site ``key`` leaves its output quantizer to the SiLU that alone reads its output
        (``state.silu_reads``): in training, where that SiLU's fused kernel can apply it in its own pass. The
        output then goes on raw and :meth:`silu` applies the quantizer (fused or not), so results do not change;
        :meth:`end_forward` checks that it did. Only with the compiled kernels (``QATKIT_FUSED_FAKE_QUANT=0``: never).
        """
        state = self.state
        if (key not in state.silu_reads or site.output is None or state.tap is not None or state.bn_live
                or type(out) is not torch.Tensor or not torch.is_grad_enabled() or not out.requires_grad
                or out.device.type != "cpu" or torch.compiler.is_compiling()
                or self._kernel_grid(site.output) is None):
            return False
        kernels.KERNELS.ensure()
        if not kernels.KERNELS.compiled:
            return False
        self._raw[id(out)] = _Deferred(out, site.output, state.sites.get(state.silu_reads[key]))
        return True

    def unraw(self, func: Callable, args, kwargs, consumer: bool = False):
        """``args``/``kwargs`` of an op with each deferred raw conv output replaced by its quantized value (computed
        once): any reader but the SiLU that applies the quantizer itself, and the folded BN between them, gets
        what the unfused run time gives it, even a reader that capture did not see. ``consumer``: this op is
        that SiLU or BN (the raw tensor goes through). Reading only its shape, dtype and such needs no values."""
        if consumer or _metadata_only(func):
            return args, kwargs
        return tuple(self.quantized(a) for a in args), {k: self.quantized(v) for k, v in kwargs.items()}

    def quantized(self, a):
        """``a`` itself, or if it is a deferred raw conv output, its quantized value (computed once)."""
        if type(a) is list or type(a) is tuple:
            return type(a)(self.quantized(b) for b in a)
        entry = self._raw.get(id(a)) if isinstance(a, torch.Tensor) else None
        if entry is None or entry.raw is not a:
            return a
        if entry.quantized is None:
            entry.quantized = self.act(entry.key, a)
        return entry.quantized

    def reset(self) -> None:
        """Forget this forward's deferred conv outputs and on-grid tensors (at the start of a forward: one that
        raised may have left some behind)."""
        self._raw = {}
        self.grid.clear()
        if not torch.compiler.is_compiling() and torch.is_grad_enabled() and len(self.layers):
            self.layers.clear()  # training inside a kept_layers scope: the weights change, free the copies

    def end_forward(self) -> None:
        """After the model's forward: every deferred conv output quantizer must have been applied by its SiLU."""
        raw = self._raw
        self.reset()
        missed = [e.key for e in raw.values() if not e.consumed and e.quantized is None]
        if missed:
            raise QatkitError(f"qatkit: the output quantizer {missed[0]!r} was left to the SiLU that reads that "
                              "conv's output, and neither that SiLU nor any op read it in this forward (it went a "
                              "way qatkit does not see, or nowhere); set QATKIT_FUSED_FAKE_QUANT=0 to quantize "
                              "every output where it is made, and report the model")

    def _kernel_grid(self, key: str) -> tuple | None:
        """Quantizer ``key`` as a fused kernel takes it, ``(scale, zero_point, qmin, qmax)``, where it is only a
        per-tensor fake-quant with its stored scale (:meth:`FakeQuantizer.plain`); None otherwise."""
        q = self.state.q(key)
        if not q.plain() or q.scheme.per_channel:
            return None
        return q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax

    def silu(self, site: Site, x: torch.Tensor, returned: bool = False) -> torch.Tensor:
        """SiLU as ``x * q(sigmoid(x))``, as the exported graph computes it (fused when training on CPU).

        ``returned``: the result is what the site returns (a functional SiLU, or an ``nn.SiLU`` layer), so the
        fused kernel may apply the site's output quantizer too; its output is then on that quantizer's grid, which
        :meth:`act` (called by :meth:`quantize_output`) knows, so it is not applied again.
        If ``x`` is a conv output whose quantizer :meth:`defer_output` left to this SiLU, it is applied here first.
        Where the sigmoid's quantizer does nothing (:meth:`FakeQuantizer.passes_through`), it is the float model's
        ``F.silu``: one op instead of two, and the float model's values.
        """
        in_key, entry = None, self._raw.get(id(x)) if self._raw else None
        if entry is not None and entry.raw is x:
            if entry.silu is site and not entry.consumed:
                in_key, entry.consumed = entry.key, True
            else:
                x = self.quantized(x)
        q = self.state.q(site.sigmoid)
        if self.state.tap is None and torch.is_grad_enabled() and x.requires_grad and q.plain():
            out = self._kernel_grid(site.output) if returned and site.output is not None else None
            inp = self._kernel_grid(in_key) if in_key is not None and out is not None else None
            if in_key is not None and inp is None:
                x, in_key = self.act(in_key, x), None
            y = quantized_silu(x, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax, out, inp)
            if y is not None:
                if out is not None:
                    self.grid.add(y, self.state.q(site.output))
                return y
        if in_key is not None:
            x = self.act(in_key, x)
        if self.state.tap is None and q.passes_through():  # (calibration with a fixed sigmoid range): the float op
            return torch.nn.functional.silu(x)
        s = self.act(site.sigmoid, torch.sigmoid(x))
        if self.state.tap is None and _eager_without_graph():
            return s.mul_(x)  # no autograd: s is this call's own tensor, so the product can take its memory
        return x * s

    def compute(self, site: Site, func: Callable, args, kwargs):
        """A functional op at ``site`` on already quantized inputs: a folded BatchNorm, SiLU as ReLU or decomposed."""
        if site.identity and not self.state.bn_live:  # a functional batch_norm folded into the conv before it
            return args[0]
        if site.relu:
            return torch.relu(args[0])
        if site.sigmoid is not None:
            return self.silu(site, args[0], returned=True)
        return func(*args, **kwargs)

    def layer_op(self, site: Site, func: Callable, args, kwargs, module: torch.nn.Module | None = None):
        """The one op inside a leaf ``module``: quantized weight/bias, folded BN, decomposed SiLU."""
        name = func_name(func)
        if self._raw:
            args, kwargs = self.unraw(func, args, kwargs, (name == "silu" and site.sigmoid is not None) or (
                name == "batch_norm" and site.identity and not self.state.bn_live))
        if site.identity and name == "batch_norm" and not self.state.bn_live:
            return args[0]
        if site.sigmoid is not None and name == "silu":
            return self.silu(site, args[0], returned=type(module) is torch.nn.SiLU)
        if site.weight is not None and name in _WEIGHT_OPS:
            return self._weighted(site, func, list(args), kwargs)
        return func(*args, **kwargs)

    def _weighted(self, site: Site, func: Callable, args: list, kwargs: dict):
        """conv/linear with its weight quantized (BatchNorm folded in) and its bias on the int32 grid; without
        autograd inside :func:`~qatkit.runtime.layer_cache.kept_layers`, the result is kept until what it is
        computed from changes."""
        bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
        wq = self.state.q(site.weight)
        if site.fold_bn is not None and self.state.bn_live:
            return self._live_fold(site, wq, func, args, kwargs, bias)
        if not (_eager_without_graph() and self.layers.enabled):
            args[1], bias = self._weight_and_bias(site, wq, args[1], bias)
        else:
            bn = None if site.fold_bn is None else self.state.module(site.fold_bn)
            bq = None if site.bias_from is None else self.state.q(site.bias_from)
            sources = (args[1], bias, bq.scale if bq is not None else None, self.state.bias_shift(site.weight),
                       *((bn.weight, bn.bias, bn.running_mean, bn.running_var) if bn is not None else ()))
            switches = (wq.fake_quant_on, wq.is_calibrated, bq is not None and _quantizing(wq, bq),
                        bn.eps if bn is not None else None, torch.is_inference_mode_enabled())
            hit = self.layers.get(site, sources, switches)
            if hit is None:
                hit = self.layers.put(site, sources, switches, *self._weight_and_bias(site, wq, args[1], bias))
            args[1], bias = hit
        if len(args) > 2:
            args[2] = bias
        else:
            kwargs["bias"] = bias
        return func(*args, **kwargs)

    def _weight_and_bias(self, site: Site, wq: FakeQuantizer, weight: torch.Tensor, bias):
        """The layer's weight through its quantizer (BatchNorm folded in, in one pass with the fake-quant) and its
        bias (folded, then on the int32 grid of ``s_input * s_weight``)."""
        if site.fold_bn is not None:
            bn = self.state.module(site.fold_bn)
            factor = bn_scale(bn)
            weight, bias = wq.quantize_weight(weight, factor), fold_bias(bias, bn, factor)
        else:
            weight = wq.quantize_weight(weight)
        shift = self.state.bias_shift(site.weight)
        if shift is not None and _quantizing(wq):  # bias correction: only where the weight quantizes
            bias = shift if bias is None else bias + shift
        if bias is not None and site.bias_from is not None and _quantizing(wq, self.state.q(site.bias_from)):
            bias = quantize_bias(bias, self.state.q(site.bias_from).scale * wq.scale)
        return weight, bias

    def _live_fold(self, site: Site, wq: FakeQuantizer, func: Callable, args: list, kwargs: dict, bias):
        """BN in train mode: the folded weight is quantized, the scaling divided back out (qatkit.bn_fold)."""
        if torch.compiler.is_compiling() and torch.is_grad_enabled():
            _refuse_live_bn_compile()
        factor = bn_scale(self.state.module(site.fold_bn))
        args[1] = wq.quantize_weight(args[1], factor)
        if len(args) > 2:
            args[2] = None
        kwargs.pop("bias", None)
        return unscale_output(func(*args, **kwargs), factor, bias)
