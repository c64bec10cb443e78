"""Calibration from the trainer's own data pipeline: training images, validation transforms, ``preprocess_batch``.

Which transforms: the *validation* ones (letterbox to ``imgsz``, no mosaic, mixup, HSV jitter or flips) on the
*training* images. Activation ranges should be those the deployed model sees, and a deployed detector sees
letterboxed, unaugmented images; mosaic and colour jitter widen some ranges and shift others, and they draw from the
global RNG, so a run's scales would depend on the seed's position rather than on the data. The training split, not
the validation split, so that validation mAP is not measured on the data the scales were fitted to. Square batches
(``rect`` off, whatever the run's ``rect``): the exported model takes a fixed square input, and rect batches would
sort the sample by aspect ratio. ``multi_scale`` is off during calibration for the same reason.

Under DDP each rank reads its shard (ultralytics' distributed sampler) and :func:`qatkit.calibrate` all-reduces the
statistics per batch, so every rank ends with the same scales, those of one process calibrating on all shards.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass

import torch
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.utils import LOCAL_RANK, LOGGER

from ...calibrate import calibrate
from ...distributed import world_size
from ...ptq import correct_bias
from .settings import QatSettings

TRANSFORMS = "val"  # what the checkpoint and the log record about the calibration data


@dataclass(frozen=True)
class CalibrationInfo:
    """What calibration did: ``batches`` steps (per rank) of ``images`` images in all, in ``seconds``."""

    batches: int
    images: int
    seconds: float
    method: str
    transforms: str = TRANSFORMS

    def as_dict(self) -> dict:
        return {"batches": self.batches, "images": self.images, "seconds": self.seconds, "method": self.method,
                "transforms": self.transforms}


@contextmanager
def _args_set(args, **values) -> Iterator[None]:
    """``args``' attributes set to ``values`` inside the block, restored after."""
    old = {k: getattr(args, k) for k in values}
    for k, v in values.items():
        setattr(args, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(args, k, v)


def calibration_loader(trainer, batch_size: int):
    """A loader of the training images with validation transforms, shuffled reproducibly, sharded under DDP.

    Args:
        trainer: the ``DetectionTrainer`` (its ``args``, ``data``, ``stride`` and ``device`` are read).
        batch_size: images per batch on this rank.

    Example:
        >>> loader = calibration_loader(trainer, 8)  # doctest: +SKIP
    """
    args = copy(trainer.args)
    args.rect, args.cache = False, False  # square batches; no second RAM/disk cache of the training set
    dataset = build_yolo_dataset(args, trainer.data["train"], batch_size, trainer.data, mode="val", rect=False,
                                 stride=trainer.stride)
    rank = LOCAL_RANK if world_size() > 1 else -1
    return build_dataloader(dataset, batch=batch_size, workers=trainer.args.workers, shuffle=True, rank=rank,
                            device=trainer.device)


def image_batches(trainer, loader, n: int) -> Iterator[torch.Tensor]:
    """The first ``n`` batches of ``loader`` through the trainer's ``preprocess_batch``, images only."""
    with _args_set(trainer.args, multi_scale=0.0):
        for i, batch in enumerate(loader):
            if i >= n:
                return
            yield trainer.preprocess_batch(batch)["img"]


def calibrate_on_training_data(trainer, model: torch.nn.Module, settings: QatSettings) -> CalibrationInfo:
    """Calibrate ``model`` (quantized, not yet wrapped) on ``settings.calib_batches`` batches of the trainer's data.

    Args:
        trainer: the ``DetectionTrainer`` whose pipeline supplies the data.
        model: the quantized model.
        settings: calibration steps and method.

    Raises:
        DataError: the training split yields no batch (from :func:`qatkit.calibrate`).

    Example:
        >>> info = calibrate_on_training_data(trainer, trainer.model, QatSettings())  # doctest: +SKIP
    """
    world = world_size()
    batch = trainer.batch_size if trainer.batch_size >= 1 else 16  # AutoBatch (batch < 1) runs after calibration
    per_rank = max(int(batch) // world, 1)
    start = time.perf_counter()
    loader = calibration_loader(trainer, per_rank)
    seen = []

    def counted():
        for img in image_batches(trainer, loader, settings.calib_batches):
            seen.append(img.shape[0])
            yield img

    report = calibrate(model, counted(), settings.calib_method)
    if settings.bias_correction:
        corrected = correct_bias(model, image_batches(trainer, loader, min(settings.calib_batches, 8)))
        LOGGER.info(f"qatkit: bias correction of {corrected.layers} layers on {corrected.batches} batch(es), "
                    f"mean shift {corrected.mean_abs_shift:.2g}")
    if hasattr(loader, "close"):
        loader.close()
    info = CalibrationInfo(report.batches, sum(seen) * world, time.perf_counter() - start,
                           settings.calib_method or "recipe")
    LOGGER.info(f"qatkit: calibrated {report.quantizers} activation quantizers on {info.batches} batch(es) "
                f"({info.images} training images, validation transforms) in {info.seconds:.1f} s")
    return info
