"""ultralytics' ``ModelEMA`` on a qatkit-quantized model: consistent quantizer state.

``ModelEMA`` deep-copies the model; a deep copy of a quantized model runs quantized on its own quantizers (the core
handles copies: tests/test_deepcopy.py).

``ModelEMA.update`` averages every floating-point tensor of the state dict: weights, BN statistics and the
quantizers' ``scale``, ``range_lo`` and ``range_hi``. It leaves the rest alone: ``zero_point`` (int32), and the
flags ``calibrated``, ``fake_quant_enabled``, ``scale_frozen`` and ``bn_frozen``. :class:`QatModelEMA` therefore
follows each update by :func:`sync_quantizers`: the flags are copied from the live model, and each static activation
quantizer's scale and zero point are recomputed from its averaged range, so an asymmetric quantizer whose range
moves during QAT (``scale_mode: ema``) never pairs an averaged scale with a stale zero point. Weight quantizers need
nothing: they recompute their range from the (averaged) weights at every forward.
"""
from __future__ import annotations

import torch
from torch import nn
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

from ...quantize import quantization_state

FLAGS = ("calibrated", "fake_quant_enabled", "scale_frozen")


@torch.no_grad()
def sync_quantizers(ema: nn.Module, model: nn.Module) -> None:
    """Make ``ema``'s quantizer state consistent after its float tensors were averaged toward ``model``'s.

    Args:
        ema: the averaged quantized model.
        model: the live quantized model (unwrapped from DDP).

    Example:
        >>> sync_quantizers(trainer.ema.ema, trainer.model)  # doctest: +SKIP
    """
    ema_state, live_state = quantization_state(ema), quantization_state(model)
    ema_state.freeze_bn(bool(live_state.bn_frozen))
    for name, q in ema_state.quantizers.items():
        live = live_state.quantizers[name]
        for flag in FLAGS:
            getattr(q, flag).copy_(getattr(live, flag))
        q.sync_flags()  # the Python mirrors forward reads
        if not q.dynamic and q.scheme.scale_mode == "ema" and q.is_calibrated:
            q.set_range(q.range_lo.clone(), q.range_hi.clone())


class QatModelEMA(ModelEMA):
    """ultralytics' ``ModelEMA`` (same decay ramp, same averaging) for a qatkit-quantized model.

    Args:
        model: the live quantized model (DDP-wrapped or not).
        **kwargs: ``ModelEMA``'s ``decay``, ``tau``, ``updates``.

    Example:
        >>> trainer.ema = QatModelEMA(trainer.model)  # doctest: +SKIP
    """

    def update(self, model: nn.Module) -> None:
        """ultralytics' averaging, then :func:`sync_quantizers`."""
        super().update(model)
        if self.enabled:
            sync_quantizers(self.ema, unwrap_model(model))
