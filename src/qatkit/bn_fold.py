"""BatchNorm folding maths: a conv (or linear) followed by a BatchNorm as the one layer a deployed graph runs.

Pure functions of tensors and the BatchNorm's parameters; :mod:`qatkit.runtime.execute` decides when each applies.

* Frozen or eval (:func:`fold`): the deployed conv, weights and bias folded with the running statistics.
* Live, BN in train mode (:func:`scale_weight` / :func:`unscale_output`): simulated folding (Jacob et al. 2018;
  PyTorch's ConvBn QAT): the weight is scaled by ``gamma / running_std`` and quantized as the deployed conv will
  be, the scaling is divided back out of the conv output, and the real BatchNorm that follows normalises with
  batch statistics and updates its running statistics.

Example usage::

    factor = bn_scale(bn)
    weight, bias = fold(conv.weight, conv.bias, bn)         # the deployed conv
    y = unscale_output(F.conv2d(x, quantize(scale_weight(conv.weight, factor))), factor, conv.bias)
"""
from __future__ import annotations

import torch
from torch import nn


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """The per-channel scale ``gamma / sqrt(running_var + eps)`` (``1 / sqrt(...)`` without affine weights)."""
    factor = torch.rsqrt(bn.running_var + bn.eps)
    return factor * bn.weight if bn.weight is not None else factor


def fold(weight: torch.Tensor, bias: torch.Tensor | None,
         bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the layer with ``bn`` (running statistics) folded in; output channels on axis 0."""
    factor = bn_scale(bn)
    return scale_weight(weight, factor), fold_bias(bias, bn, factor)


def fold_bias(bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm, factor: torch.Tensor) -> torch.Tensor:
    """The folded layer's bias, ``factor`` being :func:`bn_scale` of ``bn`` (the weight is folded by the caller,
    e.g. inside the weight quantizer's kernel)."""
    shift = -bn.running_mean * factor + (bn.bias if bn.bias is not None else 0.0)
    return shift if bias is None else bias * factor + shift


def scale_weight(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Live folding, before quantization: each output channel (axis 0) of ``weight`` times ``factor``."""
    shape = [1] * weight.ndim
    shape[0] = -1
    return weight * factor.reshape(shape)


def unscale_output(y: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Live folding, after the layer ran without bias: divide ``factor`` back out (channels on axis 1), add bias."""
    y = y / factor.reshape([1, -1] + [1] * (y.ndim - 2))
    return y if bias is None else y + bias.reshape([1, -1] + [1] * (y.ndim - 2))
