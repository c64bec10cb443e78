"""Fake-quant kernels: PyTorch's fused ops, or on float32 CPU tensors the same arithmetic in faster form.

:func:`fake_quantize` is what :class:`qatkit.quant.quantizer.FakeQuantizer` calls; every path gives PyTorch's
``fake_quantize_per_{tensor,channel}_affine`` output and gradient bit for bit (tests/test_fake_quant_cpu.py).
"""
from __future__ import annotations

import platform

import torch

_CAST_OVERFLOW_TO_MIN = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")  # cvttss2si
VECTORIZED_MIN_NUMEL = 8192  # below this, PyTorch's kernel is as fast and is one op (one dispatch) instead of eight


class _FakeQuantizeCPU(torch.autograd.Function):
    """PyTorch's fake-quant (per tensor or per channel) in vectorized ops, bit for bit, for float32 CPU tensors.

    PyTorch's CPU kernels for ``fake_quantize_per_{tensor,channel}_affine`` are scalar loops (a ``nearbyint`` per
    element; per channel also a division per element, and a second pass for the mask): 29 ms for one
    16x32x80x80 activation, where the same arithmetic in whole-tensor ops takes about 10 ms, forward and backward
    (docs/qat_overhead.md). The arithmetic, as the kernels do it: ``q = nearbyint(x * (1/s)) + zp`` (float32
    product, round half to even), mask ``qmin <= q <= qmax``, output ``(fmin(fmax(q, qmin), qmax) - zp) * s`` (a NaN
    becomes qmin); ``q - zp`` is an integer below 2**17, so the product rounds once to the same float32 as the
    kernels' products. Backward is the kernels': ``grad * mask``.
    The per-channel kernel casts ``q`` to int64 before clamping: on x86 a ``q`` of 2**63 or more (+inf included)
    becomes int64's minimum, hence qmin (ARM saturates to qmax, as fmin does); that is reproduced too.
    ``scale``/``zero_point`` come shaped to broadcast against ``x`` (0-d per tensor, ``[1, C, 1, ...]`` per channel).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # noqa: D401 - torch API
        zp = zero_point.to(torch.float32)
        q = (x * torch.reciprocal(scale)).round_().add_(zp)
        if scale.ndim and _CAST_OVERFLOW_TO_MIN:  # the per-channel kernel casts q to int64 before clamping
            q.masked_fill_(q >= 2.0**63, float("-inf"))
        c = q.clamp(qmin, qmax)
        mask = c == q  # false for NaN and +-inf, as the kernels' qmin <= q <= qmax
        # the kernels clamp with std::fmax/fmin, which map a NaN to qmin (torch.fmax/fmin would too, but they are
        # scalar loops, ten times slower than clamp + nan_to_num)
        c.nan_to_num_(nan=float(qmin), posinf=float("inf"), neginf=float("-inf"))
        ctx.save_for_backward(mask)
        return c.sub_(zp).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def _vectorizable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """One torch thread only: with two, on a machine shared with another job, its eight parallel regions lost to
    the kernel's one (82 vs 58 ms forward and backward on a 16x32x80x80 activation, docs/qat_overhead.md)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and scale.dtype == torch.float32
            and x.numel() >= VECTORIZED_MIN_NUMEL and torch.get_num_threads() == 1)


def _fake_quantize_cpu(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None,
                       qmin: int, qmax: int) -> torch.Tensor:
    """:class:`_FakeQuantizeCPU` with ``scale``/``zero_point`` shaped for ``axis`` (None: per tensor)."""
    if axis is None:
        return _FakeQuantizeCPU.apply(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    shape = [1] * x.ndim
    shape[axis] = -1
    return _FakeQuantizeCPU.apply(x, scale.reshape(shape), zero_point.reshape(shape), qmin, qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None) -> torch.Tensor:
    """Round-and-clip onto the grid with a straight-through gradient (PyTorch's fused kernels; on a float32 CPU
    tensor of 8192 elements or more, with one torch thread, the same arithmetic in vectorized ops,
    :class:`_FakeQuantizeCPU`)."""
    if _vectorizable(x, scale):
        return _fake_quantize_cpu(x, scale, zero_point, None if axis is None else axis % x.ndim, qmin, qmax)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()).int(), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.int(), axis % x.ndim, qmin, qmax)
