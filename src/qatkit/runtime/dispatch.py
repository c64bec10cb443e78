"""Op dispatch: the torch-function mode that sees every functional op of ``forward`` and runs its site."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

from ..capture import tensors_of
from ..errors import QatkitError
from ..plan import parse_key
from .execute import SCALARS, flat_tensors

if TYPE_CHECKING:
    from .hooks import ModelHooks


def reads_float(args, kwargs) -> bool:
    """Whether an op call has a floating-point tensor among its (top-level or listed) arguments."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in a):
            return True
    return False


def count_tensors(args, kwargs) -> int:
    """How many tensors ``(args, kwargs)`` holds, as capture counts them (pytree leaves); the run time's flat fast
    path (:func:`~qatkit.runtime.execute.flat_tensors`) where the call has the common shape."""
    leaves = flat_tensors(args) if all(type(v) in SCALARS for v in kwargs.values()) else None
    if leaves is None:
        return len(tensors_of((args, kwargs)))
    return sum(isinstance(t, torch.Tensor) for t in leaves)


def check_arity(key: str, expected: int, args, kwargs) -> None:
    """Raise if the op now run under ``key`` takes another number of tensors than the op capture saw there.

    Functional ops are matched by their order within a module's forward (``model.22/add#2``: its third ``add``).
    A forward that runs some ops only on its first call or when the input shape changes (cached anchors, as in
    ultralytics' detection heads) shifts the later ones, and their quantizers would land on other tensors."""
    found = count_tensors(args, kwargs)
    if found == expected:
        return
    key_parts = parse_key(key)
    raise QatkitError(
        f"'{key}' runs with {found} tensor input(s) where capture saw {expected}: the forward of "
        f"'{key_parts.module or '(the model)'}' runs other '{key_parts.op}' ops than when qatkit.quantize captured it "
        "(code that runs only on the first call or when the input shape changes, e.g. cached anchors), and its "
        "functional ops are matched by their order, so quantizers would land on the wrong tensors. Make that forward "
        "run the same ops on every call (ultralytics: model.model[-1].dynamic = True before qatkit.quantize), "
        "or keep that part float (recipe keep_head_decode_float: true, or a 'skip' rule for the "
        "module)")


class FunctionDispatch(TorchFunctionMode):
    """Active during the root module's forward (or, after a capture fallback, inside each weighted layer).

    An op inside a leaf module runs that module's site (its weight, folded BN, SiLU); an op in any other module's
    ``forward`` gets its key from the call tracker and runs its own site, if the plan has one; the recorder, during
    capture, sees every op.
    """

    def __init__(self, hooks: ModelHooks) -> None:
        super().__init__()
        self.hooks = hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        hooks = self.hooks
        stack = hooks.tracker.stack
        if hooks._paused or not stack:
            return func(*args, **kwargs)
        frame = stack[-1]
        if frame.leaf:
            site = frame.site  # looked up once by the layer's pre-hook
            if site is None:
                if hooks.run._raw:
                    args, kwargs = hooks.run.unraw(func, args, kwargs)
                return func(*args, **kwargs)
            return hooks.run.layer_op(site, func, args, kwargs, frame.module)
        return self.on_function(func, args, kwargs)

    def on_function(self, func: Callable, args, kwargs):
        """An op in a non-leaf module's ``forward``: keyed by the call tracker, run at its site if it has one."""
        hooks = self.hooks
        if not reads_float(args, kwargs):
            # integer/shape arithmetic: under torch.jit tracing (ONNX export) ``H * W`` of sizes becomes a tensor op;
            # counting it would shift the keys of the model's real ops
            return func(*args, **kwargs)
        state, run = hooks.state, hooks.run
        key = hooks.tracker.op_key(func)
        hooks.check_seen(key)
        site = state.sites.get(key)
        if site is not None and site.inputs and key in state.arity:
            check_arity(key, state.arity[key], args, kwargs)
        if run._raw:  # a conv output left raw reaches its SiLU as it is, any other op quantized (execute.py)
            silu = site is not None and site.sigmoid is not None and not site.relu and not site.inputs
            args, kwargs = run.unraw(func, args, kwargs, silu)
        if site is None:
            out = func(*args, **kwargs)
        else:
            args, kwargs = run.quantize_inputs(site, (args, kwargs))
            out = run.quantize_output(site, run.compute(site, func, args, kwargs), run.kept_on_grid(site, args))
        if state.recorder is not None:
            state.recorder.function(key, func, args, kwargs, out)
        return out
