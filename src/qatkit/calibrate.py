"""Calibrate: observe activations over user batches (float forward), then set every quantizer's scale.

Runs with fake-quant off, so each quantizer sees the float model's statistics (as pytorch-quantization and TensorRT
calibrators do). Errors name the problem: no batches, a non-finite batch, quantizers that saw no data.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import all_have
from .errors import DataError, NotCalibratedError, RecipeError
from .progress import progress_bar
from .quant.calibrators import CALIBRATORS
from .quantize import as_inputs, quantization_state
from .runtime.layer_cache import kept_layers


@dataclass
class CalibrationReport:
    batches: int
    quantizers: int
    method: str


def check_finite(inputs: tuple, where: str) -> None:
    for j, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{where}, input {j} holds NaN or Inf values: clean or filter the data before calibrating")


def calibrate(model: nn.Module, batches: Iterable, method: str | None = None, *, max_batches: int | None = None,
              quiet: bool = True) -> CalibrationReport:
    """Set the scales of ``model``'s activation quantizers from ``batches`` (tensors or tuples of inputs).

    ``method`` overrides the recipe's calibrator for every activation quantizer: one of max, ema, percentile,
    mse, entropy. Weights use per-channel max of the current weights and need no data; so do quantizers of a range
    known in advance (a SiLU's sigmoid under the recipe's ``silu_sigmoid_range: unit``).
    """
    state = quantization_state(model)
    if method is not None and method not in CALIBRATORS:
        raise RecipeError(f"unknown calibration method {method!r}; choose one of {', '.join(sorted(CALIBRATORS))}")
    acts = [q for q in state.quantizers.values() if q.calibrated_from_data]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for q in state.quantizers.values():
            q.enable_fake_quant(False)
        for q in acts:
            q.start_observing(method)
        with torch.no_grad(), kept_layers(model):  # weights do not change here: each layer's is computed once
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in progress_bar(_together(batches), "calibrate", quiet, total=total):
                if max_batches is not None and n >= max_batches:
                    break
                inputs = as_inputs(batch)
                check_finite(inputs, f"calibration batch {n}")
                model(*inputs)
                n += 1
        if n == 0:
            raise DataError("calibration got no batches: pass a non-empty iterable of input tensors (or tuples)")
        silent = [q.name for q in acts if q.calibrator is not None and q.calibrator.num_batches == 0]
        if silent:
            raise NotCalibratedError(
                f"{len(silent)} quantizer(s) saw no data during calibration: {', '.join(silent[:10])}"
                + (" ..." if len(silent) > 10 else "")
                + ". The batches never reached them (or gave them only empty tensors): calibrate with inputs that "
                "take the inference path, or keep those layers float with the recipe's 'skip' list"
            )
        for q in acts:
            q.stop_observing()
    finally:
        for q in acts:
            q.observer_enabled, q.calibrator = False, None
        for q in state.quantizers.values():
            q.enable_fake_quant(True)
        model.train(was_training)
    return CalibrationReport(n, len(acts), method or "recipe")


def _together(batches: Iterable):
    """The batches, stopping on every rank as soon as one rank runs out (DDP calibration reduces per batch)."""
    it = iter(batches)
    while True:
        batch = next(it, _END)
        if not all_have(batch is not _END):
            return
        yield batch


_END = object()


def uncalibrated(model: nn.Module) -> list[str]:
    """Names of quantizers without a scale (an exported or evaluated model must have none)."""
    return [q.name for q in quantization_state(model).quantizers.values() if not q.is_calibrated]
