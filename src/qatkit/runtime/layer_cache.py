"""Quantized weights and biases kept between forwards that build no autograd graph.

In eval, calibration, ``verify`` and sensitivity sweeps a layer's weight is folded with its BatchNorm, its range
found, fake-quantized and its bias put on the int32 grid at every forward, from tensors that have not changed.
:class:`LayerCache` keeps each layer's result with the stamps (:mod:`qatkit.runtime.tensor_stamp`) of what it was
computed from: the weight, bias, the BatchNorm's parameters and statistics and the input scale of the bias grid,
plus the quantizers' switches. Any in-place change (an optimizer step, ``load_state_dict``, calibration) bumps a
version, a replaced tensor fails the identity check, and the layer is computed again: a hit returns exactly what
recomputing would (the same tensors, the same operations).

It is on only inside :func:`kept_layers`, which qatkit's own loops enter (calibration, ``verify``, the sensitivity
sweep): there nothing changes the weights behind their version counters. Outside, every forward computes its
layers, because an in-place change made through ``param.data`` (``p.data.clamp_()``, ``p.data = ...``) keeps the
parameter's version counter and would go unnoticed. Forwards that build a graph never use it; leaving the
outermost :func:`kept_layers` frees the copies. Copies of the model (``copy.deepcopy``, pickling) start empty.

Example usage::

    with kept_layers(model):            # calibration's batch loop, verify, a sensitivity sweep
        for x in batches:
            model(x)                    # under torch.no_grad(): each layer's weight quantized once
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .tensor_stamp import Stamp, stamp, unchanged

Stamps = tuple[Stamp | None, ...]


def _stamps(sources: Sequence[torch.Tensor | None]) -> Stamps | None:
    """Each source's stamp (None for an absent source); None when a source is an inference tensor."""
    out = []
    for t in sources:
        s = None if t is None else stamp(t)
        if t is not None and s is None:
            return None
        out.append(s)
    return tuple(out)


def _unchanged(stamps: Stamps, sources: Sequence[torch.Tensor | None]) -> bool:
    return len(stamps) == len(sources) and all(
        s is None if t is None else unchanged(s, t) for s, t in zip(stamps, sources))


class LayerCache:
    """Per layer: the last quantized (weight, bias) computed without autograd, and the stamp it is valid for."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Stamps, tuple, torch.Tensor, torch.Tensor | None]] = {}
        self.depth = 0  # how many kept_layers scopes are open: the cache is used only while > 0

    @property
    def enabled(self) -> bool:
        return self.depth > 0

    def get(self, layer: object, sources: Sequence[torch.Tensor | None],
            switches: tuple) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The cached (weight, bias) of ``layer`` if ``sources`` and ``switches`` are what it was computed from."""
        entry = self._entries.get(id(layer))
        if entry is None or entry[1] != switches or not _unchanged(entry[0], sources):
            return None
        return entry[2], entry[3]

    def put(self, layer: object, sources: Sequence[torch.Tensor | None], switches: tuple, weight: torch.Tensor,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Remember (weight, bias) for ``layer``; returns them."""
        stamps = _stamps(sources)
        if stamps is not None:
            self._entries[id(layer)] = (stamps, switches, weight, bias)
        return weight, bias

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "LayerCache":
        return LayerCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entries, self.depth = {}, 0


@contextmanager
def kept_layers(model: nn.Module) -> Iterator[None]:
    """Within, forwards of the qatkit-quantized ``model`` without autograd keep each layer's quantized weight and
    bias until a tensor they are computed from changes; leaving the outermost scope frees them. A float model: no-op.

    Args:
        model: a model returned by :func:`qatkit.quantize` (or any module).

    Example:
        >>> with kept_layers(qm), torch.no_grad():
        ...     outputs = [qm(x) for x in batches]
    """
    state = getattr(model, "_qatkit", None)
    caches = [hooks.run.layers for hooks in getattr(state, "_model_hooks", [])]
    for cache in caches:
        cache.depth += 1
    try:
        yield
    finally:
        for cache in caches:
            cache.depth -= 1
            if cache.depth == 0:
                cache.clear()
