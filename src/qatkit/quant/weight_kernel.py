"""A weight's per-channel fake-quant (with a folded BatchNorm factor or not), forward and backward, in C.

Forward: inductor's compiled kernel takes the range and qparams of each output channel (one read of the weight);
``weight_kernel.c`` then fake-quantizes (a second read, one write) into an output tensor that the quantizer keeps
between steps (:class:`ReusedOutput`), written again only when nothing else holds it. So a training step allocates
no weight-sized tensor for the quantized weight, as a float step allocates none; such allocations cost page faults
whenever the allocator has handed the memory back to the system.

Backward with a factor: :func:`qatkit.quant.fake_quant_math.weight_scaled_grad` gives the weight's gradient (the
straight-through mask at the folded weight, times the factor) and the factor's (a sum over each output channel).
Inductor compiles it into two passes with a weight-sized temporary (the masked gradient, written, then read back
for the sum). The C kernel reads the gradient and the weight once and writes the weight's gradient once, with the
per-channel sum in the same loop. (It does not write into the incoming gradient: that can be the caller's own
tensor, ``y.backward(grad)``, which no reference count seen from Python tells apart.)

Outputs and weight gradients are PyTorch's bit for bit; the factor's gradient is summed in float64 (closer to the
exact sum than torch's float32 sum; last bits differ). Built and loaded by :mod:`qatkit.quant.native`; without a
compiler, or with ``QATKIT_FUSED_FAKE_QUANT=0``, both functions return None and the caller runs the compiled (or
plain) arithmetic.

Example:
    >>> w, f = torch.randn(1, 64, 300), torch.rand(64) + 0.5
    >>> inv, zp = torch.full((1, 64, 1), 40.0), torch.zeros(1, 64, 1)
    >>> out = fused_weight_grad(torch.randn(1, 64, 300), w, f, inv, zp, -127, 127, True)
    >>> out is None or out[0].shape == w.shape
    True
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from .native import NativeKernel

SOURCE = Path(__file__).with_name("weight_kernel.c")
_ARGS = [ctypes.c_void_p] * 5 + [ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64]
_GRAD = NativeKernel(SOURCE, "qatkit_weight_grad", _ARGS + [ctypes.c_void_p] * 2,
                     "QAT runs the compiled weight kernels instead")
_FORWARD = NativeKernel(SOURCE, "qatkit_weight_fake_quant", _ARGS + [ctypes.c_void_p],
                        "QAT runs the compiled weight kernels instead")
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # (absent in a torch: kept outputs never reused)


def available() -> bool:
    """Whether the C kernels are built and on (``QATKIT_FUSED_FAKE_QUANT`` is not 0)."""
    return _FORWARD.load() is not None and _GRAD.load() is not None


def _alone(t: torch.Tensor) -> bool:
    """No other tensor (view, alias, autograd's saved copy) holds ``t``'s memory: its storage is referenced by
    ``t`` and by the storage object made to ask. (The same tensor held twice is not seen: use it on tensors that
    only their owner holds.)"""
    return _USE_COUNT is not None and t._base is None and _USE_COUNT(t.untyped_storage()._cdata) == 2


class ReusedOutput:
    """A weight-sized output tensor kept between calls. :meth:`writing` gives it back while nothing else holds it
    (the autograd graph that saved it is gone), else a new one, which it keeps instead; one thread at a time (a
    second thread gets a tensor of its own). Not copied or pickled with its owner.

    Example:
        >>> out = ReusedOutput()
        >>> with out.writing(torch.zeros(4, 3)) as a:
        ...     a = a.view(4, 3)  # what the caller hands on: a tensor of its own on the same memory
        >>> del a
        >>> with out.writing(torch.zeros(4, 3)) as b:
        ...     b.data_ptr() == out.tensor.data_ptr()
        True
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def writing(self, like: torch.Tensor) -> Iterator[torch.Tensor]:
        """A tensor of ``like``'s size, dtype and device to write; make what is handed on from it (a view) inside
        the block, so that other callers see it held."""
        if not self._lock.acquire(blocking=False):
            yield torch.empty(like.shape, dtype=like.dtype, device=like.device)
            return
        try:
            t = self.tensor
            if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device or \
                    t.is_inference() != torch.is_inference_mode_enabled() or not _alone(t):
                # (an inference-mode tensor cannot be saved for backward, nor a normal one kept by inference mode)
                t = self.tensor = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            elif not t.is_inference():
                torch.autograd.graph.increment_version(t)  # written again: an alias autograd kept would say so
            yield t
        finally:
            self._lock.release()

    def __deepcopy__(self, memo) -> "ReusedOutput":
        return ReusedOutput()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _run(fn, channels: int, k: int, inputs: list[torch.Tensor | None], outputs: list[torch.Tensor],
         scalars: tuple) -> None:
    """``fn(*inputs, *scalars, channels, k, *outputs)`` on the tensors' addresses (None: NULL), in the calling
    thread. Not split between threads: with torch's OpenMP threads still spinning after their last parallel
    region, a second thread made the weight path slower on the 2-core development machine (resnet18's 18 fused
    weights, forward and backward, at 2 threads: 21.1 ms split at 64 k values, 16.1 ms not split)."""
    fn(*(None if t is None else t.data_ptr() for t in inputs), *scalars, channels, k,
       *(t.data_ptr() for t in outputs))


def _sizes(weight: torch.Tensor, channels: int, *tensors: torch.Tensor) -> int | None:
    """K, the values per channel of a ``[1, C, K]`` weight, if every tensor fits (float32 CPU, ``numel`` a
    weight's or C); else None."""
    k = weight.numel() // max(channels, 1)
    ok = channels and channels * k == weight.numel() and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() in (weight.numel(), channels)
        for t in (weight, *tensors))
    return k if ok else None


def fused_weight_fake_quant_into(weight: torch.Tensor, factor: torch.Tensor | None, inv: torch.Tensor,
                                 scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, overflow_to_min: bool,
                                 out: torch.Tensor) -> torch.Tensor | None:
    """``fake_quant(weight * factor)`` per output channel with the given qparams, written into ``out``; None where
    the kernel does not apply (not float32 CPU tensors, no compiler, turned off).

    Args:
        weight: ``[1, C, K]``, C output channels of K values (contiguous).
        factor: ``[C]`` or None.
        inv, scale, zp: per channel ``1/scale``, scale and zero point (float32, C values each).
        qmin, qmax: the grid.
        overflow_to_min: codes of 2**63 and more count as qmin (the x86 int64 cast of PyTorch's kernels).
        out: a contiguous float32 tensor of ``weight``'s size.

    Example:
        >>> w = torch.tensor([[[0.26, -1.0]]])
        >>> y = fused_weight_fake_quant_into(w, None, torch.tensor([10.0]), torch.tensor([0.1]), torch.zeros(1),
        ...                                  -8, 7, True, torch.empty(1, 1, 2))
        >>> y is None or y.tolist() == [[[0.30000001192092896, -0.800000011920929]]]
        True
    """
    channels = inv.numel()
    per_channel = [t for t in (factor, inv, scale, zp) if t is not None]
    k = _sizes(weight, channels, *per_channel, out)
    fn = _FORWARD.load()
    if k is None or fn is None or not (weight.is_contiguous() and out.is_contiguous()):
        return None
    ins = [weight] + [t if t is None else t.contiguous() for t in (factor, inv, scale, zp)]
    _run(fn, channels, k, ins, [out], (float(qmin), float(qmax), int(overflow_to_min)))
    return out


def fused_weight_grad(grad: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor, inv: torch.Tensor,
                      zp: torch.Tensor, qmin: int, qmax: int,
                      overflow_to_min: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Gradients of ``fake_quant(weight * factor)`` per output channel for ``weight`` and ``factor``: what
    :func:`qatkit.quant.fake_quant_math.weight_scaled_grad` computes, in one pass; None where the kernel does not
    apply (not float32 CPU tensors, or no compiler, or turned off).

    Args:
        grad: the output's gradient, ``weight``'s size (any shape: the weight's gradient comes back in it).
        weight: ``[1, C, K]``, C output channels of K values.
        factor: ``[C]``, the folded BatchNorm's factor.
        inv, zp: the forward's ``1/scale`` and zero point per channel (float32, C values each).
        qmin, qmax: the grid.
        overflow_to_min: codes of 2**63 and more count as qmin (the x86 int64 cast of PyTorch's kernels).

    Example:
        >>> w = torch.randn(1, 8, 20)
        >>> out = fused_weight_grad(torch.ones(1, 8, 20), w, torch.ones(8), torch.full((8,), 10.0), torch.zeros(8),
        ...                         -127, 127, True)
        >>> out is None or torch.equal(out[0], torch.ones(1, 8, 20))
        True
    """
    channels = factor.numel()
    k = _sizes(weight, channels, grad, factor, inv, zp)
    fn = _GRAD.load()
    if k is None or fn is None:
        return None
    grad, weight, factor, inv, zp = (t.contiguous() for t in (grad, weight, factor, inv, zp))
    gw, gf = torch.empty_like(grad), torch.empty(channels, dtype=torch.float32)
    _run(fn, channels, k, [grad, weight, factor, inv, zp], [gw, gf], (float(qmin), float(qmax), int(overflow_to_min)))
    return gw, gf
