"""Whether a tensor is the same one, unchanged, as when it was stamped: for the run time's memories of tensors
(:mod:`qatkit.runtime.on_grid`, :mod:`qatkit.runtime.layer_cache`).

A stamp is a weak reference (the tensor is not kept alive, and a new tensor at a reused ``id`` is not taken for
it), its version counter (bumped by every in-place change made through the tensor or a view of it) and its data
address (a ``param.data = ...`` swap keeps the version counter). Inference tensors have no version counter: they
get no stamp.

Example usage::

    s = stamp(t)          # None for an inference tensor
    unchanged(s, t)       # False once t is changed in place, swapped or freed
"""
from __future__ import annotations

import weakref

import torch

Stamp = tuple[weakref.ref, int, int]


def stamp(t: torch.Tensor) -> Stamp | None:
    """``t``'s stamp, or None for an inference tensor (``torch.inference_mode``), which has no version counter."""
    return None if t.is_inference() else (weakref.ref(t), t._version, t.data_ptr())


def unchanged(s: Stamp | None, t: torch.Tensor) -> bool:
    """Whether ``t`` is the tensor stamped ``s`` and has not changed since."""
    return (s is not None and s[0]() is t and not t.is_inference() and t._version == s[1]
            and t.data_ptr() == s[2])
