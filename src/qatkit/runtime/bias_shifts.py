"""Per-output-channel constants added to quantized layers' biases (what bias correction learns), kept in the
quantized model's own state (``model._qatkit.bias_shifts``), never in the user's parameters.

A shift is keyed by the layer's weight quantizer. The run time adds it to the layer's (folded) bias wherever that
weight quantizes, so the export's int32 bias holds it. A layer kept float (fake-quant off, a sensitivity sweep)
runs without it. Shifts exist only where something set them: a model without any has no extra state_dict keys.

Example usage::

    shifts = BiasShifts()
    shifts.set("layer1.0.conv1:weight", torch.zeros(64))
    shifts.get("layer1.0.conv1:weight")       # the tensor, or None
"""
from __future__ import annotations

import torch
from torch import nn

from ..plan import slot


class BiasShifts(nn.Module):
    """Bias shifts by weight quantizer name, as buffers (saved and loaded with the model)."""

    def get(self, weight_key: str) -> torch.Tensor | None:
        """The shift of the layer whose weight quantizer is ``weight_key``; None where none was set."""
        return self._buffers.get(slot(weight_key))

    @torch.no_grad()
    def set(self, weight_key: str, shift: torch.Tensor) -> None:
        """Set (or replace) a layer's shift: one value per output channel."""
        name = slot(weight_key)
        if name in self._buffers and self._buffers[name].shape == shift.shape:
            self._buffers[name].copy_(shift)
        else:
            self.register_buffer(name, shift.detach().clone())

    def expect(self, state_dict: dict, prefix: str) -> None:
        """Make room for the shifts a state dict holds under ``prefix`` (a checkpoint saved after bias correction,
        loaded into a freshly quantized model)."""
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if key.startswith(prefix) and "." not in name and name not in self._buffers:
                self.register_buffer(name, torch.zeros_like(value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.expect(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
