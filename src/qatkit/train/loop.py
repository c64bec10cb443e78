"""One training loop for the demo detector, used for float training and for QAT fine-tuning alike.

QAT is "the user's own loop on the quantized model": this loop knows nothing about quantization, which is
the point: a qatkit-quantized model trains like the float one.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..models.loss import detection_loss
from ..progress import progress_bar


@dataclass
class TrainConfig:
    """Optimiser schedule: AdamW, linear warm-up then cosine decay; optional weight EMA (float training)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup: int = 100
    ema_decay: float | None = 0.9995
    seed: int = 0
    log_every: int = 50


def infinite_batches(dataset: Dataset, batch_size: int, seed: int, collate_fn: Callable) -> Iterator:
    """Shuffled batches forever, reproducible from ``seed`` (epochs reshuffle with a derived seed)."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        loader = DataLoader(dataset, batch_size, shuffle=True, generator=g, collate_fn=collate_fn, drop_last=True)
        yield from loader
        epoch += 1


class WeightEMA:
    """Exponential moving average of parameters and buffers (a standard detector-training stabiliser)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 2000))
        current = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[name].detach(), alpha=1 - d)
            else:
                value.copy_(current[name])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and quantizer scales (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_detector(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    collate_fn: Callable,
    *,
    quiet: bool = False,
    description: str = "train",
) -> nn.Module:
    """Train ``model`` in place for ``config.steps`` steps; returns the EMA model if enabled, else ``model``."""
    torch.manual_seed(config.seed)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay else None
    batches = infinite_batches(dataset, config.batch_size, config.seed, collate_fn)
    bar = progress_bar(range(config.steps), description, quiet)
    for step in bar:
        images, targets = next(batches)
        loss, parts = detection_loss(model(images), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        if step % config.log_every == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", cls=f"{parts['cls']:.3f}", box=f"{parts['box']:.3f}")
    return ema.model if ema is not None else model.eval()
