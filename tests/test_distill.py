"""Distillation during QAT: off by default, one switch; the loss pulls the quantized student to the float teacher."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qatkit
from qatkit.apps.runconfig import RunConfig
from qatkit.train.distill import Distiller


def test_distillation_is_off_by_default_and_one_switch():
    assert RunConfig().distill is False
    assert RunConfig(distill=True).distill is True


def pair():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    student = qatkit.quantize(copy.deepcopy(teacher).eval(), {"base": "onnxruntime", "weight": {"bits": 3}},
                              (torch.rand(1, 3, 8, 8),))
    qatkit.calibrate(student, [torch.rand(4, 3, 8, 8)], method="max")
    return teacher, student


def test_output_and_feature_distillation_loss_drives_the_student_to_the_teacher():
    teacher, student = pair()
    with torch.no_grad():  # a student that drifted away from its teacher
        for p in (student[0].weight, student[2].weight):
            p.add_(0.2 * torch.randn_like(p))
    d = Distiller(teacher, student, weight=1.0, features=["1"])
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    student.train()
    for _ in range(60):
        loss = d.loss(x, student(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_unknown_feature_module_is_named():
    teacher, student = pair()
    with pytest.raises(qatkit.QatkitError, match="no module 'neck'"):
        Distiller(teacher, student, features=["neck"])
