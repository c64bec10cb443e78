"""The fake-quant arithmetic that :mod:`qatkit.quant.kernels` compiles: PyTorch's CPU fake-quant kernels written as
whole-tensor ops (bit for bit), and the fused forms built on them (SiLU with its quantizers, a weight's range,
qparams and fake-quant with a folded BatchNorm factor), each with its gradient.

Pure functions of tensors and grid integers, traceable by dynamo; they run uncompiled where compiling fails.

Example:
    >>> y = fake_quantize_math(torch.randn(8), torch.tensor(10.0), torch.tensor(0.1), torch.tensor(0.0), -128, 127,
    ...                        False)
"""
from __future__ import annotations

import torch

from .qparams import qparams_of


def codes(x: torch.Tensor, inv_scale: torch.Tensor, zp: torch.Tensor, overflow_to_min: bool) -> torch.Tensor:
    """``nearbyint(x * (1/s)) + zp`` as float32, as PyTorch's kernels compute it (``overflow_to_min``: the
    per-channel kernel's int64 cast on x86, which turns 2**63 and more, +inf included, into qmin)."""
    q = torch.round(x * inv_scale) + zp
    return torch.where(q >= 2.0**63, float("-inf"), q) if overflow_to_min else q


def fake_quantize_math(x: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int,
                       qmax: int, overflow_to_min: bool) -> torch.Tensor:
    """PyTorch's fake-quant forward in whole-tensor ops, bit for bit.

    The kernels' arithmetic: ``q = nearbyint(x * (1/s)) + zp`` (float32 product, round half to even), output
    ``(fmin(fmax(q, qmin), qmax) - zp) * s`` (so a NaN becomes qmin); ``q - zp`` is an integer below 2**17, so the
    product rounds once to the same float32 as the kernels' products. ``scale``/``zp`` (float32) and ``inv_scale``
    come shaped to broadcast against ``x`` (0-d per tensor, ``[1, C, 1]`` per channel).
    """
    q = codes(x, inv_scale, zp, overflow_to_min)
    c = torch.where(q >= qmin, q, qmin)  # fmax: NaN -> qmin
    c = torch.where(c <= qmax, c, qmax)
    return grid_values(c, scale, zp)


def grid_values(c: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """The values of codes ``c`` (float32, already clamped to the grid): ``(c - zp) * s``, as the kernels give
    them. The kernels subtract in integers, so a code at the zero point is +0.0; a compiled graph that knows zp is
    0 (symmetric weights) drops the subtraction and would keep round()'s -0.0."""
    return torch.where(c == zp, 0.0, (c - zp) * scale)


def fake_quantize_grad(grad: torch.Tensor, x: torch.Tensor, inv_scale: torch.Tensor, zp: torch.Tensor, qmin: int,
                       qmax: int, overflow_to_min: bool) -> torch.Tensor:
    """The kernels' backward, ``grad * mask`` with mask ``qmin <= q <= qmax`` (false for NaN and +-inf), the codes
    recomputed from ``x`` (one pass reading ``grad`` and ``x``; no mask tensor kept between forward and backward)."""
    q = codes(x, inv_scale, zp, overflow_to_min)
    return grad * ((q >= qmin) & (q <= qmax))


def quantized_silu_math(x: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int,
                        qmax: int) -> torch.Tensor:
    """SiLU as the exported graph computes it, ``x * fake_quant(sigmoid(x))`` (per-tensor grid)."""
    return x * fake_quantize_math(torch.sigmoid(x), inv_scale, scale, zp, qmin, qmax, False)


def quantized_silu_grad(grad: torch.Tensor, x: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor,
                        zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Gradient of :func:`quantized_silu_math`: the product rule with the straight-through fake-quant, as autograd
    computes it for the three separate ops (``sigmoid_backward`` is ``g * (1 - s) * s``)."""
    s = torch.sigmoid(x)
    q = codes(s, inv_scale, zp, False)
    through = (grad * x) * ((q >= qmin) & (q <= qmax))
    return grad * fake_quantize_math(s, inv_scale, scale, zp, qmin, qmax, False) + through * (1 - s) * s


def quantized_silu_out_math(x: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                            qmin: int, qmax: int, out_inv: torch.Tensor, out_scale: torch.Tensor, out_zp: torch.Tensor,
                            out_qmin: int, out_qmax: int) -> torch.Tensor:
    """:func:`quantized_silu_math` and then the SiLU output's own fake-quant, in one pass (per-tensor grids)."""
    return fake_quantize_math(quantized_silu_math(x, inv_scale, scale, zp, qmin, qmax), out_inv, out_scale, out_zp,
                              out_qmin, out_qmax, False)


def quantized_silu_out_grad(grad: torch.Tensor, x: torch.Tensor, inv_scale: torch.Tensor, scale: torch.Tensor,
                            zp: torch.Tensor, qmin: int, qmax: int, out_inv: torch.Tensor, out_zp: torch.Tensor,
                            out_qmin: int, out_qmax: int) -> torch.Tensor:
    """Gradient of :func:`quantized_silu_out_math`: the output's straight-through mask (its codes recomputed from
    ``x``), then :func:`quantized_silu_grad`."""
    z = quantized_silu_math(x, inv_scale, scale, zp, qmin, qmax)
    return quantized_silu_grad(fake_quantize_grad(grad, z, out_inv, out_zp, out_qmin, out_qmax, False), x, inv_scale,
                               scale, zp, qmin, qmax)


def quantized_silu_in_out_math(x: torch.Tensor, in_inv: torch.Tensor, in_scale: torch.Tensor, in_zp: torch.Tensor,
                               in_qmin: int, in_qmax: int, *silu_out) -> torch.Tensor:
    """:func:`quantized_silu_out_math` of ``x`` fake-quantized by the SiLU input's quantizer (the quantizer of the
    conv output it reads), all in one pass; ``silu_out`` are :func:`quantized_silu_out_math`'s grid arguments."""
    z = fake_quantize_math(x, in_inv, in_scale, in_zp, in_qmin, in_qmax, False)
    return quantized_silu_out_math(z, *silu_out)


def quantized_silu_in_out_grad(grad: torch.Tensor, x: torch.Tensor, in_inv: torch.Tensor, in_scale: torch.Tensor,
                               in_zp: torch.Tensor, in_qmin: int, in_qmax: int, *silu_out) -> torch.Tensor:
    """Gradient of :func:`quantized_silu_in_out_math`: :func:`quantized_silu_out_grad` at the quantized input,
    then the input quantizer's straight-through mask; ``silu_out`` as :func:`quantized_silu_out_grad` takes them."""
    z = fake_quantize_math(x, in_inv, in_scale, in_zp, in_qmin, in_qmax, False)
    return fake_quantize_grad(quantized_silu_out_grad(grad, z, *silu_out), x, in_inv, in_zp, in_qmin, in_qmax, False)


def weight_qparams_math(w: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """A weight's per-output-channel range and qparams taken from the weight itself, ``w`` as ``[1, C, K]``:
    (scale, zero point, lo, hi, 1/scale)."""
    lo, hi = w[0].amin(dim=1), w[0].amax(dim=1)  # (aminmax along a dim is a slow ATen fallback)
    scale, zp = qparams_of(lo, hi, qmin, qmax, symmetric)
    return scale, zp, lo, hi, torch.reciprocal(scale)


def weight_scaled_qparams_math(w: torch.Tensor, factor: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """:func:`weight_qparams_math` of ``w`` times ``factor`` per output channel (a BatchNorm folded in)."""
    return weight_qparams_math(w * factor.view(1, -1, 1), qmin, qmax, symmetric)


def weight_math(w: torch.Tensor, qmin: int, qmax: int, symmetric: bool, overflow_to_min: bool):
    """A weight's per-output-channel fake-quant with its range taken from the weight itself, ``w`` as
    ``[1, C, K]``: (output, scale, zero point, lo, hi, 1/scale). What
    :class:`qatkit.quant.quantizer.FakeQuantizer` does for a dynamic weight, in one graph."""
    scale, zp, lo, hi, inv = weight_qparams_math(w, qmin, qmax, symmetric)
    y = fake_quantize_math(w, inv.view(1, -1, 1), scale.view(1, -1, 1), zp.view(1, -1, 1).to(torch.float32), qmin,
                           qmax, overflow_to_min)
    return y, scale, zp, lo, hi, inv


def weight_scaled_math(w: torch.Tensor, factor: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                       overflow_to_min: bool):
    """:func:`weight_math` of ``w`` times ``factor`` per output channel (a BatchNorm folded in, in the same pass)."""
    return weight_math(w * factor.view(1, -1, 1), qmin, qmax, symmetric, overflow_to_min)


def weight_scaled_grad(grad: torch.Tensor, w: torch.Tensor, factor: torch.Tensor, inv: torch.Tensor,
                        zp: torch.Tensor, qmin: int, qmax: int, overflow_to_min: bool):
    """Gradients of :func:`weight_scaled_math`'s output for ``w`` and ``factor``: the fake-quant's mask at the
    folded weight, then the product rule (the ``w`` gradient is autograd's bit for bit; ``factor``'s is a sum over
    each channel, whose order may differ from ATen's in the last bit)."""
    g = fake_quantize_grad(grad, w * factor.view(1, -1, 1), inv, zp, qmin, qmax, overflow_to_min)
    return g * factor.view(1, -1, 1), (g * w).sum(dim=(0, 2))
