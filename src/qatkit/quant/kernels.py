"""Fake-quant kernels: PyTorch's fused ops, or on float32 CPU tensors the same arithmetic in faster form.

:func:`fake_quantize` is what :class:`qatkit.quant.quantizer.FakeQuantizer` calls; every path gives PyTorch's
``fake_quantize_per_{tensor,channel}_affine`` output and gradient bit for bit (tests/test_fake_quant_cpu.py).
The calibrators' elementwise arithmetic (:mod:`qatkit.quant.calibration_math`: histogram binning, the MSE
search's error terms) is compiled by the same machinery.
"""
from __future__ import annotations

import math
import os
import platform
import warnings

import torch

from ..errors import QatkitError, QatkitWarning
from .calibration_math import bin_index_math, sq_error_terms
from .fake_quant_math import (fake_quantize_grad, fake_quantize_math, quantized_silu_grad, quantized_silu_in_out_grad,
                              quantized_silu_in_out_math, quantized_silu_math, quantized_silu_out_grad,
                              quantized_silu_out_math, weight_math, weight_qparams_math, weight_scaled_grad,
                              weight_scaled_math, weight_scaled_qparams_math)
from .weight_kernel import ReusedOutput, available, fused_weight_fake_quant_into, fused_weight_grad

_CAST_OVERFLOW_TO_MIN = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")  # cvttss2si
# Below these sizes PyTorch's kernel is as fast: the compiled kernel's call costs about 25 us forward (one thread;
# per tensor, PyTorch's kernel takes ~10 ns an element forward and backward, the compiled one ~2; per channel ~4 vs 1)
VECTORIZED_MIN_NUMEL = 8192
PER_CHANNEL_MIN_NUMEL = 16384
# The weight kernels see a weight as [1, C, K] (C output channels of K values). A size marked unbacked is never
# specialised, but inductor does not fuse loops over it: with C unbacked too, the forward takes the minima and the
# maxima in two passes over the weight. So the forward leaves C backed (still one compile, as C >= 2: sizes 0 and 1
# would specialise). The backward with a BatchNorm factor is a C kernel (qatkit.quant.weight_kernel).
_WEIGHT_SIZES_MIN = 2


def _unbacked(*tensors: torch.Tensor, dims=(0, 1, 2)) -> None:
    """No 0/1 specialisation of these sizes in the compiled kernels (so a size of 1 does not compile again)."""
    for t in tensors:
        for dim in dims:
            torch._dynamo.decorators.mark_unbacked(t, dim)


def first_order_only(what: str) -> None:
    """Raise if autograd is recording a backward (``create_graph=True``): the fused CPU kernels compute their
    gradient outside autograd, so its own gradient (a second-order term) would be silently missing."""
    if torch.is_grad_enabled():
        raise QatkitError(f"second-order gradients (create_graph=True) through qatkit's fused CPU {what} are not "
                          "supported: their backward is computed outside autograd, so those terms would be missing. "
                          "Compute the gradient without create_graph, or on a GPU (PyTorch's fake-quant ops)")


def _without_modes(fn, args: tuple):
    """``fn(*args)`` with no torch-function mode active: qatkit's run time calls quantizers inside its own mode,
    which a compiled kernel would otherwise trace into (and guard on, compiling twice)."""
    n = torch._C._len_torch_function_stack()
    if not n:
        return fn(*args)
    modes = [torch._C._pop_torch_function_stack() for _ in range(n)]
    try:
        return fn(*args)
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


class _Kernels:
    """The fused CPU kernels: :func:`fake_quantize_math` and its backward (and the other functions of ``_PLAIN``)
    compiled once by inductor (one pass over the tensor each, vectorized and multi-threaded, where PyTorch's CPU
    fake-quant kernels are scalar loops).

    If compiling fails (no C++ compiler, an inductor error), it says so once and the same arithmetic runs as
    separate whole-tensor ops. ``QATKIT_FUSED_FAKE_QUANT=0`` turns the compiled kernels off, and with them this
    module's CPU paths: every fake-quant is then PyTorch's own op, as on a GPU (:attr:`off`), so a CPU run shows
    what a GPU dispatches.
    """

    def __init__(self) -> None:
        self._use(_PLAIN)
        self.compiled = False
        self._warned = False
        self._setting = os.environ.get("QATKIT_FUSED_FAKE_QUANT", "1")
        self._tried = False

    @property
    def off(self) -> bool:
        """Whether ``QATKIT_FUSED_FAKE_QUANT=0`` turned the CPU kernels off (PyTorch's fake-quant ops run instead)."""
        return self._setting == "0"

    @classmethod
    def uncompiled(cls) -> "_Kernels":
        """The arithmetic as separate whole-tensor ops (what runs when compiling fails)."""
        k = cls()
        k._tried = True
        return k

    def ensure(self) -> None:
        if self._tried:
            return
        if self._setting not in ("0", "1"):
            raise QatkitError(f"QATKIT_FUSED_FAKE_QUANT={self._setting!r}: set it to 1 (compiled fake-quant kernels, "
                              "the default) or 0 (the same arithmetic unfused), or unset it")
        self._tried = True
        if self._setting == "0":
            return
        try:
            self._use({name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in _PLAIN.items()})
            self.compiled = True
        except Exception as e:  # noqa: BLE001 - any compile failure: the uncompiled arithmetic is exact too
            self.fail(e)

    def _use(self, kernels: dict) -> None:
        for name, fn in kernels.items():
            setattr(self, name, fn)

    def run(self, which: str, *args) -> torch.Tensor:
        """The kernel ``which`` (a name of ``_PLAIN``: ``forward``, ``backward``, ``silu_*``, ``weight``, ``bin_index``,
        ``sq_error_terms``) on ``args``.

        If the compiled kernel fails (inductor cannot compile it, or dynamo refuses to recompile it), this call and
        every later one use the uncompiled arithmetic, which gives the same result."""
        try:
            return _without_modes(getattr(self, which), args)
        except Exception as e:  # noqa: BLE001 - any failure of the compiled kernel: the plain arithmetic is exact too
            if not self.compiled:
                raise
            self.fail(e)
            return getattr(self, which)(*args)

    def fail(self, error: Exception) -> None:
        """Use the uncompiled arithmetic from now on, and say so (once)."""
        self._use(_PLAIN)
        self.compiled = False
        if self._warned:
            return
        self._warned = True
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"qatkit: the compiled CPU fake-quant kernels failed ({type(error).__name__}: {first_line}); "
                      "QAT continues with the same arithmetic unfused, which is slower. If torch.compile cannot build "
                      "C++ kernels here, install a C++ compiler (g++); set QATKIT_FUSED_FAKE_QUANT=0 to use the "
                      "unfused kernels without this warning", QatkitWarning, stacklevel=4)


class _FakeQuantizeCPU(torch.autograd.Function):
    """PyTorch's fake-quant (per tensor or per channel) on float32 CPU tensors, bit for bit, output and gradient.

    PyTorch's CPU kernels for ``fake_quantize_per_{tensor,channel}_affine`` are scalar loops (a ``nearbyint`` per
    element; per channel also a division per element, and a second pass for the mask): 29.6 ms forward and
    backward for one 16x32x80x80 activation on one thread, where the compiled :func:`fake_quantize_math` takes
    2.3 ms (`benchmarks/fake_quant_kernels.py`, docs/performance.md). Backward is the kernels': ``grad * mask``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # noqa: D401 - torch API
        # one rank per kind, so that the compiled kernels never recompile: per tensor 1-d, per channel
        # (outer, C, inner); reshape copies only a non-contiguous x
        # (detached: not a view, so no guards on x's base; per channel no 0/1 specialization of outer/inner sizes)
        if axis is None:
            flat, shape = x.detach().reshape(-1).detach(), ()
        else:
            flat, shape = x.detach().reshape(math.prod(x.shape[:axis]), x.shape[axis], -1).detach(), (1, -1, 1)
            if KERNELS.compiled:
                _unbacked(flat)
        scale, zp = scale.reshape(shape), zero_point.reshape(shape).to(torch.float32)
        inv = torch.reciprocal(scale)
        overflow = axis is not None and _CAST_OVERFLOW_TO_MIN
        y = KERNELS.run("forward", flat, inv, scale, zp, qmin, qmax, overflow)
        ctx.save_for_backward(flat, inv, zp)
        ctx.grid = (qmin, qmax, overflow)
        return y.view(x.shape).detach()  # not a view: the model may modify it in place (resnet: out += identity)

    @staticmethod
    def backward(ctx, grad):
        first_order_only("fake-quant kernels")
        flat, inv, zp = ctx.saved_tensors
        g = grad.reshape(flat.shape).detach()
        if KERNELS.compiled and flat.ndim == 3:
            _unbacked(g, flat)
        return KERNELS.run("backward", g, flat, inv, zp, *ctx.grid).view(grad.shape), None, None, None, None, None


class _FakeQuantizeTraced(torch.autograd.Function):
    """The same arithmetic for ``torch.compile`` of a quantized model: plain ops that dynamo traces and inductor
    fuses with the neighbouring ops (no nested compiled kernel, no reshape). ``scale``/``zero_point`` come shaped
    to broadcast against ``x``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, overflow):  # noqa: D401 - torch API
        inv, zp = torch.reciprocal(scale), zero_point.to(torch.float32)
        ctx.save_for_backward(x, inv, zp)
        ctx.grid = (qmin, qmax, overflow)
        return fake_quantize_math(x, inv, scale, zp, qmin, qmax, overflow)

    @staticmethod
    def backward(ctx, grad):
        x, inv, zp = ctx.saved_tensors
        return fake_quantize_grad(grad, x, inv, zp, *ctx.grid), None, None, None, None, None


def _traced(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None, qmin: int,
            qmax: int) -> torch.Tensor:
    if axis is None:
        return _FakeQuantizeTraced.apply(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax, False)
    shape = [1] * x.ndim
    shape[axis] = -1
    return _FakeQuantizeTraced.apply(x, scale.reshape(shape), zero_point.reshape(shape), qmin, qmax,
                                     _CAST_OVERFLOW_TO_MIN)


def _weight_forward(flat: torch.Tensor, f: torch.Tensor | None, qmin: int, qmax: int, symmetric: bool,
                    reuse: ReusedOutput | None) -> tuple:
    """(output, scale, zero point, lo, hi, 1/scale) of a ``[1, C, K]`` weight (times ``f``): into ``reuse``'s
    tensor by the C kernel where there is one (range and qparams compiled), else in one compiled kernel."""
    grid = (qmin, qmax, symmetric)
    if reuse is not None and available():
        scale, zp, lo, hi, inv = (KERNELS.run("weight_qparams", flat, *grid) if f is None
                                  else KERNELS.run("weight_scaled_qparams", flat, f, *grid))
        with reuse.writing(flat) as out:
            y = fused_weight_fake_quant_into(flat, f, inv, scale, zp.to(torch.float32), qmin, qmax,
                                             _CAST_OVERFLOW_TO_MIN, out)
            y = None if y is None else y.view(flat.shape)  # (held before another caller may take the tensor)
        if y is not None:
            return y, scale, zp, lo, hi, inv
    if f is None:
        return KERNELS.run("weight", flat, *grid, _CAST_OVERFLOW_TO_MIN)
    return KERNELS.run("weight_scaled", flat, f, *grid, _CAST_OVERFLOW_TO_MIN)


class _WeightFakeQuantCPU(torch.autograd.Function):
    """A dynamic per-channel weight quantizer (range, qparams, fake-quant) with ``factor`` (or None) multiplied
    into each output channel first: compiled range and qparams, then the C kernel of
    :mod:`qatkit.quant.weight_kernel` into a kept output (else one compiled kernel). Backward is the fake-quant's
    (the per-channel kernel of :class:`_FakeQuantizeCPU`), and with ``factor`` the product rule in the same pass
    (the C kernel; the compiled arithmetic where it is not built)."""

    @staticmethod
    def forward(ctx, weight, factor, qmin, qmax, symmetric, reuse):  # noqa: D401 - torch API
        flat = weight.detach().reshape(1, weight.shape[0], -1).detach()
        _unbacked(flat, dims=(2,))  # see _WEIGHT_SIZES_MIN
        f = None if factor is None else factor.detach().reshape(-1).detach()
        y, scale, zp, lo, hi, inv = _weight_forward(flat, f, qmin, qmax, symmetric, reuse)
        ctx.save_for_backward(flat, inv.view(1, -1, 1), zp.view(1, -1, 1).to(torch.float32),
                              *(() if f is None else (f,)))
        ctx.grid = (qmin, qmax, _CAST_OVERFLOW_TO_MIN)
        ctx.mark_non_differentiable(scale, zp, lo, hi)
        return y.view(weight.shape).detach(), scale, zp, lo, hi

    @staticmethod
    def backward(ctx, grad, *_):
        first_order_only("weight fake-quant kernels")
        if len(ctx.saved_tensors) == 3:
            return _FakeQuantizeCPU.backward(ctx, grad)[0], None, None, None, None, None
        flat, inv, zp, f = ctx.saved_tensors
        fused = fused_weight_grad(grad, flat, f, inv, zp, *ctx.grid)
        if fused is not None:
            return fused[0], fused[1], None, None, None, None
        g, w = grad.reshape(flat.shape).detach(), flat.detach()  # (w: flat's sizes are marked for the forward)
        _unbacked(g, w, dims=(1, 2))
        _unbacked(f, dims=(0,))
        gw, gf = KERNELS.run("weight_scaled_backward", g, w, f, inv, zp, *ctx.grid)
        return gw.view(grad.shape), gf, None, None, None, None


def fused_weight_fake_quant(weight: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                            factor: torch.Tensor | None = None, reuse: ReusedOutput | None = None):
    """A dynamic per-output-channel (axis 0) weight quantizer: range and qparams compiled, the fake-quant in C into
    ``reuse``'s tensor (without ``reuse``, or without the C kernel, all three in one compiled kernel); PyTorch's
    ops bit for bit. None where it does not apply (not float32 CPU, small, inside torch.compile, or compiling
    failed): the caller then runs the separate ops. Returns (output shaped like ``weight``, scale, zero point, lo,
    hi).

    Args:
        weight: a conv/linear weight, output channels on axis 0.
        qmin, qmax, symmetric: the quantizer's grid.
        factor: None, or one value per output channel that the weight is multiplied by first, in the same pass (a
            folded BatchNorm's ``gamma / sqrt(running_var + eps)``); it gets its gradient too.
        reuse: where the output may be written (its tensor kept between calls: no new weight-sized tensor a step).

    Example:
        >>> y, scale, zp, lo, hi = fused_weight_fake_quant(torch.randn(64, 32, 3, 3), -64, 63, True)
        >>> y, *_ = fused_weight_fake_quant(torch.randn(64, 32, 3, 3), -64, 63, True, factor=torch.rand(64) + 0.5)
    """
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.numel() < PER_CHANNEL_MIN_NUMEL
            or min(weight.shape[0], weight.numel() // weight.shape[0]) < _WEIGHT_SIZES_MIN
            or torch.compiler.is_compiling()
            or (factor is not None and (factor.dtype != torch.float32 or factor.numel() != weight.shape[0]))):
        return None
    KERNELS.ensure()
    if not KERNELS.compiled:
        return None
    return _WeightFakeQuantCPU.apply(weight, factor, qmin, qmax, symmetric, reuse)


def _vectorizable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """A float32 CPU tensor large enough that the compiled kernel beats PyTorch's (and the kernels not switched
    off: ``QATKIT_FUSED_FAKE_QUANT=0`` runs PyTorch's ops, as a GPU does)."""
    return (not KERNELS.off and x.device.type == "cpu" and x.dtype == torch.float32 and scale.dtype == torch.float32
            and x.numel() >= (PER_CHANNEL_MIN_NUMEL if scale.numel() > 1 else VECTORIZED_MIN_NUMEL))


def _fake_quantize_cpu(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None,
                       qmin: int, qmax: int) -> torch.Tensor:
    """:class:`_FakeQuantizeCPU`; ``scale``/``zero_point`` hold one value (``axis`` None) or one per channel."""
    KERNELS.ensure()
    return _FakeQuantizeCPU.apply(x, scale, zero_point, qmin, qmax, axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None) -> torch.Tensor:
    """Round-and-clip onto the grid with a straight-through gradient, bit for bit PyTorch's fused ops (which run
    on other devices, small tensors and with ``QATKIT_FUSED_FAKE_QUANT=0``); on a float32 CPU tensor of 8192
    elements or more (16384 per channel), the compiled kernel of :class:`_FakeQuantizeCPU`; inside
    ``torch.compile``, on float32 CPU tensors, plain ops that inductor fuses (:class:`_FakeQuantizeTraced`).

    Example:
        >>> y = fake_quantize(torch.randn(4, 8), torch.tensor(0.1), torch.tensor(0), -128, 127, None)
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.compiler.is_compiling():
        return _traced(x, scale, zero_point, None if axis is None else axis % x.ndim, qmin, qmax)
    if _vectorizable(x, scale):
        return _fake_quantize_cpu(x, scale, zero_point, None if axis is None else axis % x.ndim, qmin, qmax)
    if axis is None:
        return _per_tensor(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, _int32(zero_point), axis % x.ndim, qmin, qmax)


def _int32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int32, with no op where it is already (the quantizers' zero points are)."""
    return t if t.dtype == torch.int32 else t.int()


_ENABLED: dict[torch.device, torch.Tensor] = {}  # the "fake-quant enabled" flag PyTorch's op takes, per device


def _per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """PyTorch's per-tensor fake-quant with tensor qparams as one dispatched op: the ATen op that
    ``torch.fake_quantize_per_tensor_affine`` calls (same output and mask gradient), without the two reshapes and the
    ``ones`` flag tensor it makes on every call (on a GPU, each of those is a launch of its own)."""
    if torch.compiler.is_compiling() or scale.numel() != 1 or zero_point.numel() != 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()).int(), qmin, qmax)
    enabled = _ENABLED.get(x.device)
    if enabled is None:
        enabled = _ENABLED[x.device] = torch.ones(1, dtype=torch.long, device=x.device)
    return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
        x, scale, _int32(zero_point), enabled, qmin, qmax)[0]


_PLAIN = {"forward": fake_quantize_math, "backward": fake_quantize_grad, "silu_forward": quantized_silu_math,
          "silu_backward": quantized_silu_grad, "silu_out_forward": quantized_silu_out_math,
          "silu_out_backward": quantized_silu_out_grad, "silu_in_out_forward": quantized_silu_in_out_math,
          "silu_in_out_backward": quantized_silu_in_out_grad, "weight": weight_math,
          "weight_scaled": weight_scaled_math, "weight_scaled_backward": weight_scaled_grad,
          "weight_qparams": weight_qparams_math, "weight_scaled_qparams": weight_scaled_qparams_math,
          "bin_index": bin_index_math, "sq_error_terms": sq_error_terms}  # what _Kernels compiles, by name
KERNELS = _Kernels()  # compiled at first use
