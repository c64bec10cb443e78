"""``qatkit.quantize``: capture the model, place quantizers per the recipe, attach them. No model edits."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .capture import Graph, Recorder
from .errors import QatkitError, QatkitWarning
from .placement import place
from .recipes import Recipe, load_recipe, recipe_to_dict
from .runtime import QuantState


def as_inputs(example_inputs) -> tuple:
    """A tensor or a sequence of inputs as the positional-argument tuple for ``model(*inputs)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, not {type(example_inputs).__name__}")


def _failure_site(model: nn.Module, tb) -> str:
    """The innermost module of ``model`` (and the function) a traceback went through, for the fallback warning."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    where = "<root>"
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names and not isinstance(owner, QuantState):
            where = f"{names[id(owner)]} ({type(owner).__name__}), in {tb.tb_frame.f_code.co_name}()"
        tb = tb.tb_next
    return where


def capture(model: nn.Module, example_inputs) -> Graph:
    """Run ``model`` once (eval mode, no grad) and record its dataflow graph.

    The recording is the same Python-level interception torch.export(strict=False) uses (a torch-function mode),
    with real tensors, so data-dependent control flow simply runs. If the model cannot run under it but runs
    plainly, capture falls back to module-level placement and warns once, naming where capture stopped.
    """
    state = QuantState()
    state.recorder = Recorder()
    state.attach(model)
    was_training = model.training
    inputs = as_inputs(example_inputs)
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
        return state.recorder.graph
    except Exception as e:  # noqa: BLE001 - any failure under recording: try the model plainly, then fall back
        where, error = _failure_site(model, e.__traceback__), f"{type(e).__name__}: {e}"
    finally:
        state.detach()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as plain:
        raise QatkitError(f"the model fails on example_inputs even without qatkit ({type(plain).__name__}: "
                          f"{plain}); pass inputs its forward accepts") from plain
    finally:
        model.train(was_training)
    warnings.warn(f"qatkit: capture stopped in {where} ({error}); falling back to module-level placement: "
                  "conv/linear inputs and weights get quantizers, functional ops (add, cat, ...) stay float and "
                  "BatchNorm is not folded", QatkitWarning, stacklevel=3)
    return Graph.modules_only(model, f"{where}: {error}")


def silu_to_relu(model: nn.Module) -> int:
    """Replace every ``nn.SiLU`` submodule by ``nn.ReLU`` (same names, no parameters, so state_dict keys stay).

    Functional ``F.silu`` calls are switched at run time by the placement (site ``relu``). Returns the count.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, nn.SiLU):
                setattr(parent, name, nn.ReLU())
                count += 1
    return count


def quantization_state(model: nn.Module) -> QuantState:
    state = getattr(model, "_qatkit", None)
    if not isinstance(state, QuantState):
        raise QatkitError(
            f"{type(model).__name__} is not quantized by qatkit: call qatkit.quantize(model, recipe, example_inputs)"
        )
    return state


def quantize(model: nn.Module, recipe: "str | Path | dict | Recipe" = "onnxruntime", example_inputs=None) -> nn.Module:
    """Add quantizers to ``model`` in place (and return it): same class, forward and state_dict keys, plus ``_qatkit``.

    The quantizers start uncalibrated; run :func:`qatkit.calibrate` before using the model.
    """
    if isinstance(getattr(model, "_qatkit", None), QuantState):
        raise QatkitError(
            "model is already quantized by qatkit; quantize the float model (or qatkit.load a checkpoint)"
        )
    if example_inputs is None:
        raise QatkitError("quantize() needs example_inputs, e.g. (torch.rand(1, 3, 640, 640),), to capture the graph")
    recipe = load_recipe(recipe)
    if recipe.silu_to_relu:
        silu_to_relu(model)
    graph = capture(model, example_inputs)
    placement = place(graph, recipe, model)
    shapes = [list(t.shape) for t in as_inputs(example_inputs) if isinstance(t, torch.Tensor)]
    state = QuantState(placement.sites, placement.quantizers, recipe_to_dict(recipe), placement.outputs, shapes,
                       placement.float_layers)
    state.known = graph.seen
    state.silu_reads = placement.silu_reads
    state.arity = {key: len(graph.nodes[key].inputs) for key, site in placement.sites.items()
                   if site.inputs and "/" in key and key in graph.nodes}
    state.functional = graph.fallback is None
    device = _device_of(model)
    if device is not None:  # a model already on a GPU: its quantizers' buffers go with it
        state.to(device)
    model.add_module("_qatkit", state)
    state.attach(model)
    return model


def _device_of(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model that holds no tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def freeze(model: nn.Module, *, bn: bool = True, scales: bool = False) -> nn.Module:
    """The QAT freeze schedule (call it at the step you choose; it is saved in checkpoints).

    ``bn``: BatchNorm stops using batch statistics and updating running ones; every conv then trains exactly as it
    will be deployed (weights folded with running statistics). ``scales``: activation scales stop changing (EMA
    updates stop, learned scales stop learning); weight scales always follow the weights.
    """
    state = quantization_state(model)
    if bn:
        state.freeze_bn()
    if scales:
        for q in state.quantizers.values():
            if not q.dynamic:
                q.freeze_scale()
    return model
