"""The training forward ``model(batch)`` as ``model.loss(batch, model(batch["img"]))``.

Ultralytics' loop calls the model on the whole batch dict, and ``DetectionModel.forward`` computes the loss inside
that call. For a qatkit-quantized model that is wrong twice: the hooks take the root call's inputs as the model
inputs, so the model-input quantizer would quantize the first floating-point tensor of the dict (``batch_idx``,
the dict's keys are sorted) instead of the image; and the loss would run under qatkit's torch-function mode. The
wrapper calls the model on the image tensor, as capture, validation and export do, and computes the loss outside it,
which is what ultralytics itself does with ``compile=True``.

The wrapped model is the wrapper's ``module``, so ultralytics' ``unwrap_model`` (EMA, optimizer groups,
checkpoints, criterion updates) sees through it as through DDP.
"""
from __future__ import annotations

from torch import nn
from ultralytics.utils.torch_utils import unwrap_model


class ImageThenLoss(nn.Module):
    """``forward(batch_dict)`` -> ``(loss, loss_items)`` with the model called on ``batch["img"]`` alone.

    Args:
        module: the quantized ``DetectionModel``, or DDP around it.

    Example:
        >>> trainer.model = ImageThenLoss(trainer.model)  # doctest: +SKIP
        >>> loss, items = trainer.model(trainer.preprocess_batch(batch))  # doctest: +SKIP
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x, *args, **kwargs):
        if not isinstance(x, dict):
            return self.module(x, *args, **kwargs)
        preds = self.module(x["img"])
        return unwrap_model(self.module).loss(x, preds)
