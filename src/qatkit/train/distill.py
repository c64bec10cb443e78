"""Distillation during QAT from the float model: output-level, optionally feature-level (yolo_deepstream, YOLOv6).

The float teacher sees the same images; the student (the quantized model) is pulled towards its raw outputs (and
the named modules' outputs) by a mean-squared error added to the task loss. Raw head outputs (logits, box
distributions) carry more than the labels do, which is what recovers accuracy lost to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import tensors_of
from ..errors import QatkitError


class Distiller:
    def __init__(self, teacher: nn.Module, student: nn.Module, weight: float = 1.0,
                 features: list[str] | tuple[str, ...] = ()) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight = weight
        self._feats: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        for name in features:
            for role, model in (("student", student), ("teacher", self.teacher)):
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise QatkitError(f"distill_features: the model has no module {name!r}") from None
                module.register_forward_hook(self._keep(role, name))

    def _keep(self, role: str, name: str):
        def hook(_module, _args, out):
            self._feats[role][name] = out if isinstance(out, torch.Tensor) else tensors_of(out)[0]
        return hook

    def loss(self, images: torch.Tensor, student_out) -> torch.Tensor:
        """``weight`` x (MSE of every output tensor + MSE of every named feature), teacher without gradients."""
        with torch.no_grad():
            teacher_out = self.teacher(images)
        pairs = list(zip(tensors_of(student_out), tensors_of(teacher_out)))
        pairs += [(self._feats["student"][k], v) for k, v in self._feats["teacher"].items()]
        return self.weight * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs)
