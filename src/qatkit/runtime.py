"""Run time of a quantized model: hooks and a torch-function mode apply quantizers at captured call sites.

The user's module keeps its class, ``forward``, attributes and ``state_dict`` keys; qatkit adds one submodule,
``_qatkit`` (a :class:`QuantState`), holding the quantizers and the site table, plus forward hooks. Leaf modules get
their inputs/outputs quantized in hooks; inside a conv/linear the weight (with any following BatchNorm folded in)
and bias are quantized; functional ops are quantized where the mode sees them.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .capture import Recorder
from .errors import QatkitWarning
from .plan import ROOT, Site, module_of, slot
from .quant.quantizer import FakeQuantizer, quantize_bias
from .tracing import CallTracker, func_name

_WEIGHT_OPS = {"conv1d", "conv2d", "conv3d", "linear"}


def _reads_float(args, kwargs) -> bool:
    """Whether an op call has a floating-point tensor among its (top-level or listed) arguments."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in a):
            return True
    return False


class _Mode(TorchFunctionMode):
    def __init__(self, state: "QuantState") -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.state.on_function(func, args, kwargs or {})


class QuantState(nn.Module):
    """Quantizers, the site table and the recipe of one quantized model (registered as ``model._qatkit``)."""

    def __init__(self, sites: dict[str, Site] | None = None, quantizers: dict[str, FakeQuantizer] | None = None,
                 recipe: dict | None = None, outputs: list[str | None] | None = None,
                 example_shapes: list[list[int]] | None = None, float_layers: list[str] | None = None) -> None:
        super().__init__()
        self.float_layers = float_layers or []  # conv/linear layers the recipe keeps float (lint, export metadata)
        self.outputs = outputs or []  # quantizer key per model output, None where the output is float
        self.example_shapes = example_shapes or []
        self.quantizers = nn.ModuleDict({slot(k): q for k, q in (quantizers or {}).items()})
        self.sites = sites or {}
        self.recipe = recipe or {}
        self.recorder: Recorder | None = None
        self.known: set[str] = set()  # keys seen at capture (empty: don't check)
        self._warned = False
        self._handles: list = []
        self._mode: _Mode | None = None
        self._active = False  # inside the root module's forward
        # BN folding: "live" (train mode, not frozen) simulates the fold and lets BN use and update batch
        # statistics; frozen or eval uses running statistics, exactly the deployed conv. A buffer: saved, resumed.
        self.register_buffer("bn_frozen", torch.tensor(False))
        self.functional = True  # False after a capture fallback: module hooks only, no torch-function mode
        self._paused = False
        self.tap: Callable[[FakeQuantizer, torch.Tensor], torch.Tensor] | None = None

    # --------------------------------------------------------------- attach
    def attach(self, root: nn.Module) -> None:
        """Install the hooks on ``root`` and all its submodules (except qatkit's own)."""
        object.__setattr__(self, "_root", root)
        self.tracker = CallTracker(root)
        own = {id(m) for m in self.modules()}
        self._handles.append(root.register_forward_pre_hook(self._root_pre))
        self._handles.append(root.register_forward_hook(self._root_post, always_call=True))
        for _, module in root.named_modules():
            if module is root or id(module) in own:
                continue
            self._handles.append(module.register_forward_pre_hook(self._module_pre))
            self._handles.append(module.register_forward_hook(self._module_post, always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(self, x=None, *args):
        """Identity: a root ``nn.Sequential`` calls every child, this one included; it must not change data."""
        return x

    def q(self, key: str) -> FakeQuantizer:
        return self.quantizers[slot(key)]

    @contextmanager
    def paused(self):
        """Quantizer calls made from hooks are qatkit's own ops, not the model's: don't count them."""
        prev, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = prev

    # --------------------------------------------------------------- hooks
    def _root_pre(self, module: nn.Module, args):
        self.tracker.reset()
        self.tracker.push(module)
        if self.recorder is not None:
            self.recorder.inputs(args)
        site = self.sites.get(ROOT)
        if site is not None and site.inputs:
            with self.paused():
                args = self._quantize_inputs(site, args)
        self._active = True
        if self.functional:
            self._mode = _Mode(self)
            self._mode.__enter__()
        return args

    def _root_post(self, module: nn.Module, args, output):
        self._active = False
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self.tracker.reset()
        if self.recorder is not None:
            self.recorder.model_outputs(output)
        return output

    def _module_pre(self, module: nn.Module, args):
        if not self._active:  # called outside the root's forward: plain float module
            return None
        frame = self.tracker.push(module)
        if not frame.leaf:
            return None
        self._check_seen(frame.key)
        if self.recorder is not None:
            self.recorder.module_call(frame.key, module_of(frame.key), module, args)
        site = self.sites.get(frame.key)
        if not self.functional and site is not None and site.weight is not None:
            self._mode = _Mode(self)  # capture fallback: the mode runs only inside this layer, for its weight
            self._mode.__enter__()
        if site is not None and site.inputs:
            with self.paused():
                return self._quantize_inputs(site, args)
        return None

    def _module_post(self, module: nn.Module, args, output):
        if not self._active or not self.tracker.stack:
            return output
        frame = self.tracker.pop()
        if frame.leaf:
            if not self.functional and self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None
            site = self.sites.get(frame.key)
            if site is not None and (site.output is not None or site.fold_into is not None):
                with self.paused():
                    output = self._quantize_output(site, output)
            if self.recorder is not None:
                self.recorder.module_return(frame.key, output)
        return output

    # --------------------------------------------------------------- functional ops
    def on_function(self, func: Callable, args, kwargs):
        frame = self.tracker.top
        if self._paused or frame is None:
            return func(*args, **kwargs)
        if frame.leaf:
            site = self.sites.get(frame.key)
            return func(*args, **kwargs) if site is None else self._inner(site, func, args, kwargs)
        if not _reads_float(args, kwargs):
            # integer/shape arithmetic: under torch.jit tracing (ONNX export) ``H * W`` of sizes becomes a tensor op;
            # counting it would shift the keys of the model's real ops
            return func(*args, **kwargs)
        key = self.tracker.op_key(func)
        self._check_seen(key)
        site = self.sites.get(key)
        if site is None:
            out = func(*args, **kwargs)
        else:
            args, kwargs = self._quantize_inputs(site, (args, kwargs))
            if site.identity and not self.bn_live:  # a functional batch_norm folded into the conv before it
                out = args[0]
            elif site.relu:
                out = torch.relu(args[0])
            elif site.sigmoid is not None:
                out = self._silu(site, args[0])
            else:
                out = func(*args, **kwargs)
            out = self._quantize_output(site, out)
        if self.recorder is not None:
            self.recorder.function(key, func, args, kwargs, out)
        return out

    def _check_seen(self, key: str) -> None:
        """Warn once when an op runs that capture never saw: it has no quantizer, so it runs float."""
        if self.known and key not in self.known and not self._warned and self.recorder is None:
            self._warned = True
            warnings.warn(f"qatkit: '{key}' did not run when the model was captured (control flow that depends on "
                          "the input or on train/eval mode), so it runs float; capture with example inputs that take "
                          "this path to quantize it", QatkitWarning, stacklevel=4)

    def _inner(self, site: Site, func: Callable, args, kwargs):
        """The one op inside a leaf module: quantized weight/bias, folded BN, decomposed SiLU."""
        name = func_name(func)
        if site.identity and name == "batch_norm" and not self.bn_live:
            return args[0]
        if site.sigmoid is not None and name == "silu":
            return self._silu(site, args[0])
        if site.weight is not None and name in _WEIGHT_OPS:
            args = list(args)
            bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
            wq = self.q(site.weight)
            if site.fold_bn is not None and self.bn_live:
                return self._live_fold(site, wq, func, args, kwargs, bias)
            weight, bias = self._fold_bn(site, args[1], bias)
            args[1] = wq(weight)
            if bias is not None and site.bias_from is not None:
                bias = quantize_bias(bias, self.q(site.bias_from).scale * wq.scale)
            if len(args) > 2:
                args[2] = bias
            else:
                kwargs["bias"] = bias
            return func(*args, **kwargs)
        return func(*args, **kwargs)

    @property
    def bn_live(self) -> bool:
        return self._root.training and not bool(self.bn_frozen)

    def _live_fold(self, site: Site, wq: FakeQuantizer, func: Callable, args: list, kwargs: dict, bias):
        """Simulated folding while BN trains (Jacob et al. 2018; PyTorch's ConvBn QAT): the weight is scaled by
        gamma / running_std and quantized as the deployed conv will be, the scaling is divided back out, and the
        real BatchNorm that follows normalises with batch statistics and updates its running statistics."""
        _, factor = self._bn_factor(site)
        shape = [1] * args[1].ndim
        shape[0] = -1
        args[1] = wq(args[1] * factor.reshape(shape))
        if len(args) > 2:
            args[2] = None
        kwargs.pop("bias", None)
        y = func(*args, **kwargs)
        y = y / factor.reshape([1, -1] + [1] * (y.ndim - 2))
        return y if bias is None else y + bias.reshape([1, -1] + [1] * (y.ndim - 2))

    def _bn_factor(self, site: Site) -> tuple[nn.Module, torch.Tensor]:
        """The BatchNorm folded into ``site``'s conv and its per-channel scale ``gamma / sqrt(running_var + eps)``."""
        bn = self._root.get_submodule(site.fold_bn)
        factor = torch.rsqrt(bn.running_var + bn.eps)
        return bn, factor * bn.weight if bn.weight is not None else factor

    def _fold_bn(self, site: Site, weight: torch.Tensor, bias: torch.Tensor | None):
        """Fold the following BatchNorm (running statistics) into the conv, as the deployed graph does."""
        if site.fold_bn is None:
            return weight, bias
        bn, factor = self._bn_factor(site)
        shift = -bn.running_mean * factor + (bn.bias if bn.bias is not None else 0.0)
        weight = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        bias = shift if bias is None else bias * factor + shift
        return weight, bias

    def _silu(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        return x * self.apply_act(site.sigmoid, torch.sigmoid(x))

    def _quantize_inputs(self, site: Site, tree):
        leaves, spec = tree_flatten(tree)
        idx = 0
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                key = site.inputs.get(idx)
                if key is not None and leaf.is_floating_point():
                    leaves[i] = self.apply_act(key, leaf)
                idx += 1
        return tree_unflatten(leaves, spec)

    def _quantize_output(self, site: Site, out):
        """The site's output quantizer; while BN is live, a conv's moves to the output of its BatchNorm."""
        key = site.output
        if self.bn_live and (site.fold_bn is not None or site.fold_into is not None):
            key = None if site.fold_bn is not None else self.sites[site.fold_into].output
        if key is None:
            return out
        return tree_map(lambda t: self.apply_act(key, t) if isinstance(t, torch.Tensor) and t.is_floating_point()
                        else t, out)

    def apply_act(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Apply an activation quantizer; ``tap`` (set by :func:`qatkit.verify`) may observe or replace the result."""
        q = self.q(key)
        y = q(x)
        return y if self.tap is None else self.tap(q, y)

    def site_table(self) -> dict:
        """Plain-data copy of the sites, for checkpoints (kept out of state_dict: jit tracing needs tensors only)."""
        return {k: asdict(s) for k, s in self.sites.items()}
