"""One training loop for the demo detector, used for float training and for QAT fine-tuning alike.

QAT is "the user's own loop on the quantized model": this loop knows nothing about quantization, which is
the point: a qatkit-quantized model trains like the float one.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import atomic_save, read_checkpoint
from ..errors import CheckpointError
from .models.loss import detection_loss
from ..progress import progress_bar
from ..train.distill import Distiller

STATE_FORMAT = "qatkit-train-state-1"


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
    checkpoint_every: int = 0  # steps between training-state checkpoints (0: none)


def infinite_batches(dataset: Dataset, batch_size: int, seed: int, collate_fn: Callable, start: int = 0,
                     rank: int = 0, world: int = 1) -> Iterator:
    """Shuffled batches forever, reproducible from ``seed`` (epochs reshuffle with a derived seed).

    The order is a ``randperm`` per epoch (what a shuffling DataLoader draws), so ``start`` skips batches without
    loading them: a resumed run sees exactly the batches the uninterrupted run would have. Under DDP, step ``b``
    of rank ``r`` takes the ``b * world + r``-th batch of the epoch.
    """
    per_epoch = len(dataset) // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size} per rank")
    epoch, offset = divmod(start, per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for b in range(offset, per_epoch):
            first = (b * world + rank) * batch_size
            yield collate_fn([dataset[i] for i in order[first:first + batch_size]])
        epoch, offset = epoch + 1, 0


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
    state_path: str | Path | None = None,
    resume: bool = False,
    step_hooks: dict[int, Callable[[nn.Module], object]] | None = None,
    distiller: "Distiller | None" = None,
) -> nn.Module:
    """Train ``model`` in place for ``config.steps`` steps; returns the EMA model if enabled, else ``model``.

    With ``state_path``, the full training state (weights and every buffer, quantizer state included, optimiser,
    schedule, step, RNG) is written there atomically every ``config.checkpoint_every`` steps; ``resume=True``
    continues from it, ending where the uninterrupted run ends. ``step_hooks[k](model)`` runs before step ``k``
    (e.g. ``qatkit.freeze`` for the QAT freeze schedule). ``distiller`` adds its loss (QAT from the float model).
    """
    torch.manual_seed(config.seed)
    model.train()
    world, rank = distributed.world_size(), distributed.rank()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # the model's own hooks still run
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay else None
    start = 0
    if resume and state_path is not None and Path(state_path).is_file():
        start = _restore(state_path, model, opt, sched, ema)
    hooks = step_hooks or {}
    for k in sorted(k for k in hooks if k < start):  # a resumed run replays the schedule it already passed
        hooks[k](model)
    batches = infinite_batches(dataset, config.batch_size, config.seed, collate_fn, start, rank, world)
    bar = progress_bar(range(start, config.steps), description, quiet or rank > 0)
    for step in bar:
        if step in hooks:
            hooks[step](model)
        images, targets = next(batches)
        out = net(images)
        loss, parts = detection_loss(out, targets)
        if distiller is not None:
            loss = loss + distiller.loss(images, out)
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
        if (state_path is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
                and rank == 0):
            atomic_save({"format": STATE_FORMAT, "step": step + 1, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "ema": ema.model.state_dict() if ema is not None else None,
                         "ema_updates": ema.updates if ema is not None else 0,
                         "rng": torch.get_rng_state()}, state_path)
    return ema.model if ema is not None else model.eval()


def _restore(path: str | Path, model: nn.Module, opt, sched, ema: WeightEMA | None) -> int:
    state = read_checkpoint(path, STATE_FORMAT)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"training state {path} does not belong to this model/recipe: {e}") from None
    sched.load_state_dict(state["scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.model.load_state_dict(state["ema"])
        ema.updates = int(state["ema_updates"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
