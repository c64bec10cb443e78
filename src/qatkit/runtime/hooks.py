"""Hooks: forward (pre-)hooks on every submodule keep track of module calls and quantize leaf inputs/outputs."""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import QatkitWarning
from ..plan import ROOT, module_of
from ..tracing import CallTracker
from .dispatch import FunctionDispatch
from .execute import SiteExecutor
from .on_grid import VALUE_PRESERVING

if TYPE_CHECKING:
    from ..plan import Site
    from ..tracing import Frame
    from .state import QuantState

_RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))
# where PyTorch's compiler runs its own torch calls (tracing, AOTAutograd wrappers, inductor's generated code)
_COMPILER_PATHS = ("/torch/_dynamo/", "/torch/_inductor/", "/torch/_functorch/", "/torch/_subclasses/", "/torch/fx/",
                   "torchinductor")
COMPILE_OUTSIDE_HOOKS = (
    "qatkit: torch.compile ran this model's top-level hooks outside its graph (what torch.compile(model) and "
    "model.compile() do when the model's class is not from torch.nn), so qatkit's op interception stayed active "
    "around the compiled code and sees PyTorch's own calls (extra Python work per call, and these warnings); "
    "compile inside `with torch._dynamo.config.patch(wrap_top_frame=True):` (the hooks are "
    "then traced into the one graph) or compile a function that calls the model, such as the training step"
)


def _called_by_compiler() -> bool:
    """Whether the op now reaching the mode was called by PyTorch's compiler, not by the model (the first frame
    outside qatkit's run time and ``torch.overrides`` is compiler code). Only looked at before a warning."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_RUNTIME_DIR) or name.endswith("overrides.py")):
            name = name.replace(os.sep, "/")
            return any(p in name for p in _COMPILER_PATHS)
        frame = frame.f_back
    return False


class ModelHooks:
    """The hooks ``state`` installs on ``root`` and everything they share during one forward.

    The root's pre-hook starts a forward (quantized model inputs, the function mode entered), each submodule's hooks
    push/pop the call tracker and run leaf sites, and the root's post-hook ends it. ``state.recorder``, during
    capture, is told about the model inputs, every leaf call and the model outputs.

    Example usage::

        hooks = ModelHooks(state, model)   # installed
        model(x)
        hooks.remove()
    """

    def __init__(self, state: QuantState, root: nn.Module) -> None:
        self.state, self.root = state, root
        self.tracker = CallTracker(root)
        self.run = SiteExecutor(state)
        self._handles: list = []
        self._mode: FunctionDispatch | None = None
        self._active = False  # inside the root module's forward
        self._paused = False
        self._warned = False
        own = {id(m) for m in state.modules()}
        self._handles.append(root.register_forward_pre_hook(self._root_pre))
        self._handles.append(root.register_forward_hook(self._root_post, always_call=True))
        for _, module in root.named_modules():
            if module is root or id(module) in own:
                continue
            self._handles.append(module.register_forward_pre_hook(self._module_pre))
            self._handles.append(module.register_forward_hook(self._module_post, always_call=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Quantizer calls made from hooks are qatkit's own ops, not the model's: don't count them."""
        prev, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = prev

    @property
    def is_paused(self) -> bool:
        return self._paused

    def check_seen(self, key: str) -> None:
        """Warn once when an op runs that capture never saw: it has no quantizer, so it runs float.

        The once-flag is read only for such an op: read on every call, ``torch.compile`` would guard on it and
        recompile the graph when the first warning sets it."""
        state = self.state
        if not state.known or key in state.known or state.recorder is not None:
            return
        if not self._warned:
            self._warned = True
            if _called_by_compiler():
                warnings.warn(COMPILE_OUTSIDE_HOOKS, QatkitWarning, stacklevel=2)
                return
            warnings.warn(f"qatkit: '{key}' did not run when the model was captured (control flow that depends on "
                          "the input or on train/eval mode), so it runs float; capture with example inputs that take "
                          "this path to quantize it", QatkitWarning, stacklevel=4)

    def _enter_mode(self) -> None:
        self._mode = FunctionDispatch(self)
        self._mode.__enter__()

    def _exit_mode(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def _root_pre(self, module: nn.Module, args):
        self.tracker.reset()
        self.run.reset()
        self.tracker.push(module)
        if self.state.recorder is not None:
            self.state.recorder.inputs(args)
        site = self.state.sites.get(ROOT)
        if site is not None and site.inputs:
            args = self._quantize_paused(self.run.quantize_inputs, site, args)
        self._active = True
        if self.state.functional:
            self._enter_mode()
        return args

    def _root_post(self, module: nn.Module, args, output):
        self._active = False
        self._exit_mode()
        self.tracker.reset()
        if sys.exc_info()[1] is not None:  # the forward raised (PyTorch calls this hook while handling it)
            self.run.reset()  # its own error is what the user needs, not one about a quantizer it did not reach
        else:
            if self.run._raw:  # a conv output left raw for its SiLU, returned as well: the quantized value
                output = self._quantize_paused(lambda _, out: tree_map(self.run.quantized, out), None, output)
            self.run.end_forward()
        if self.state.recorder is not None:
            self.state.recorder.model_outputs(output)
        return output

    def _quantize_paused(self, fn, site, tree):
        """``fn(site, tree)``: qatkit's own ops (quantizers, observers), not the model's. The mode is paused (what
        :meth:`paused` does, without a generator per call) and, while it is the innermost mode, taken off the stack:
        a paused mode still costs every op a Python call (about 1 us; calibration's observers run ~15 ops a tensor).
        """
        prev, self._paused = self._paused, True
        mode = self._step_out()
        try:
            return fn(site, tree)
        finally:
            if mode is not None:
                torch._C._push_on_torch_function_stack(mode)
            self._paused = prev

    def _step_out(self) -> FunctionDispatch | None:
        """This forward's mode, popped off the torch-function stack if it is on top of it (not under
        ``torch.compile``, which traces the hooks into its graph); None if it was left where it is."""
        mode = self._mode
        if mode is None or torch.compiler.is_compiling():
            return None
        depth = torch._C._len_torch_function_stack()
        if depth == 0 or torch._C._get_function_stack_at(depth - 1) is not mode:
            return None
        return torch._C._pop_torch_function_stack()

    def _module_pre(self, module: nn.Module, args):
        if not self._active:  # called outside the root's forward: plain float module
            return None
        frame = self.tracker.push(module)
        if not frame.leaf:
            return None
        key = frame.key
        self.check_seen(key)
        state = self.state
        if state.recorder is not None:
            state.recorder.module_call(key, module_of(key), module, args)
        site = frame.site = state.sites.get(key)  # the mode runs this site for the layer's own op
        if site is None:
            return None
        if not state.functional and site.weight is not None:
            self._enter_mode()  # capture fallback: the mode runs only inside this layer, for its weight
        if site.kind in VALUE_PRESERVING and site.output is not None and self.run.grid:
            frame.on_grid = self._quantize_paused(self.run.kept_on_grid, site, args)
        if site.inputs:
            if self.run._raw:  # (a layer with input quantizers reads what the unfused run time gives it)
                args = self._quantize_paused(lambda _, a: self.run.quantized(a), site, args)
            return self._quantize_paused(self.run.quantize_inputs, site, args)
        return None

    def _leaf_output(self, site: Site, output_frame: tuple[object, Frame]):
        """A leaf layer's output through its site's output quantizer, unless its SiLU applies that itself."""
        output, frame = output_frame
        if self.state.silu_reads and self.run.defer_output(site, output, frame.key):
            return output
        return self.run.quantize_output(site, output, frame.on_grid)

    def _module_post(self, module: nn.Module, args, output):
        stack = self.tracker.stack
        if not self._active or not stack:
            return output
        frame = stack.pop()
        if frame.leaf:
            state = self.state
            if not state.functional:
                self._exit_mode()
            site = frame.site
            if site is not None and (site.output is not None or site.fold_into is not None):
                output = self._quantize_paused(self._leaf_output, site, (output, frame))
            if state.recorder is not None:
                state.recorder.module_return(frame.key, output)
        return output
