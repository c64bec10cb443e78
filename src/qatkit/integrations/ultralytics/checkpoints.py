"""``weights/last.pt`` and ``weights/best.pt`` of a QAT run: qatkit checkpoints with ultralytics' training state.

Each file is an ordinary ``qatkit-quantized-1`` checkpoint of the EMA model (what :func:`qatkit.save` writes, read
with ``torch.load(weights_only=True)``; no pickled code), so ``qatkit.load``, ``qatkit.apps.stages.load_quantized``,
:func:`load_model` and the ``qatkit`` CLI (``export``, ``verify``, ``inspect``) read it like any quantized
checkpoint. Its ``metadata`` holds, as plain data:

- ``stage``: ``ultralytics-qat``;
- ``model``: the model source record (:mod:`qatkit.apps.model_source`: kind, spec and the architecture dict
  ``model.yaml``), so the architecture is rebuilt from the file alone;
- ``names``: the class names;
- ``ultralytics`` (:data:`STATE_KEY`): the training state for resume: epoch, optimizer (``last.pt`` only, and only
  until the run ends), grad scaler, EMA update count, best fitness, early-stopping state, the train arguments, the
  last metrics, the calibration record and the QAT settings.
"""
from __future__ import annotations

from datetime import datetime
from numbers import Number
from pathlib import Path

import numpy as np
import torch
from torch import nn
from ultralytics import __version__ as ultralytics_version

from ...checkpoint import FORMAT, atomic_save, read_checkpoint, save
from ...errors import CheckpointError
from ...apps.model_source import ModelSource
from ...apps.stages import load_quantized

STAGE = "ultralytics-qat"
STATE_KEY = "ultralytics"
STATE_VERSION = 1  # bump when a key of the training state changes meaning
_WHAT = ("resume takes weights/last.pt of a run of qatkit.integrations.ultralytics.train (a qatkit checkpoint "
         "with ultralytics training state)")


def plain(obj):
    """``obj`` as data ``torch.load(weights_only=True)`` reads: tensors, numbers, strings, None, lists, dicts.

    Paths become strings, numpy scalars and arrays Python numbers and lists, anything else its ``str``.

    Example:
        >>> plain({"save_dir": Path("runs/x"), "fitness": np.float64(0.5), "imgsz": (64, 64)})
        {'save_dir': 'runs/x', 'fitness': 0.5, 'imgsz': [64, 64]}
    """
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, dict):
        return {(k if isinstance(k, (int, str)) else str(k)): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.generic, Number)):
        return obj.item() if hasattr(obj, "item") else float(obj)
    return str(obj)


def train_state(trainer, *, optimizer: bool) -> dict:
    """The trainer's resumable state as plain data (tensors only inside the optimizer state).

    Args:
        trainer: a ``QatDetectionTrainer`` after at least one epoch.
        optimizer: include the optimizer state (``last.pt``) or not (``best.pt``).
    """
    calibration = trainer.calibration.as_dict() if trainer.calibration is not None else trainer.resumed_calibration
    return {
        "version": STATE_VERSION,
        "epoch": int(trainer.epoch),
        "best_fitness": plain(trainer.best_fitness),
        "fitness": plain(trainer.fitness),
        "stopper": {"best_fitness": plain(trainer.stopper.best_fitness), "best_epoch": int(trainer.stopper.best_epoch)},
        "ema_updates": int(trainer.ema.updates),
        "optimizer": trainer.optimizer.state_dict() if optimizer else None,
        "scaler": plain(trainer.scaler.state_dict()),
        "train_args": plain(vars(trainer.args)),
        "train_metrics": plain({**(trainer.metrics or {}), "fitness": trainer.fitness}),
        "calibration": plain(calibration),
        "qat": plain(trainer.qat.describe()),
        "ultralytics_version": ultralytics_version,
        "date": datetime.now().astimezone().isoformat(),
    }


def save_checkpoint(model: nn.Module, path: str | Path, source: ModelSource, state: dict) -> Path:
    """Write ``model`` (the quantized EMA) with its source, class names and training ``state`` to ``path``.

    Args:
        model: the quantized model to store (its ``names`` attribute, if any, is recorded).
        path: the file, written atomically.
        source: where the float model came from (its record holds the architecture).
        state: :func:`train_state`'s result.

    Example:
        >>> save_checkpoint(trainer.ema.ema, "weights/last.pt", source, train_state(trainer, optimizer=True))
        ... # doctest: +SKIP
    """
    names = plain(dict(getattr(model, "names", None) or {}))
    metadata = {"stage": STAGE, "model": source.record(model), "names": names, STATE_KEY: state}
    return save(model, path, metadata=metadata)


def read_train_checkpoint(path: str | Path, *, need_optimizer: bool = True) -> dict:
    """The whole checkpoint at ``path``, checked to be a resumable QAT checkpoint of this integration.

    Args:
        path: ``weights/last.pt`` of a run.
        need_optimizer: raise if the optimizer state is missing (``best.pt``, or a finished run's ``last.pt``).

    Raises:
        CheckpointError: not a qatkit checkpoint, a qatkit checkpoint without ultralytics training state, a newer
            state version, or no optimizer state; each message names the fix.

    Example:
        >>> ckpt = read_train_checkpoint("runs/detect/qat/weights/last.pt")  # doctest: +SKIP
    """
    try:
        ckpt = read_checkpoint(path, FORMAT)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. {_WHAT}; an ultralytics checkpoint (yolo train) starts a new QAT run: "
                              "train(YOLO(path), data=...)") from None
    state = ckpt["metadata"].get(STATE_KEY)
    if not isinstance(state, dict):
        stage = ckpt["metadata"].get("stage", "unknown")
        raise CheckpointError(f"{path} is a quantized qatkit checkpoint (stage {stage}) without ultralytics training "
                              f"state, so there is nothing to resume: {_WHAT}")
    if state.get("version", 0) > STATE_VERSION:
        raise CheckpointError(f"{path} holds ultralytics training state version {state['version']}, newer than this "
                              f"qatkit reads ({STATE_VERSION}): upgrade qatkit")
    if need_optimizer and state.get("optimizer") is None:
        raise CheckpointError(f"{path} holds no optimizer state (best.pt never does; last.pt loses it when its run "
                              "ends): resume from weights/last.pt of an unfinished run; a finished run is not "
                              "resumed, start a new QAT run from its float model instead")
    return ckpt


def drop_optimizer(path: str | Path) -> None:
    """Rewrite ``path`` without its optimizer state (what ultralytics does to last.pt when a run ends)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["metadata"][STATE_KEY]["optimizer"] = None
    atomic_save(ckpt, path)


def load_model(path: str | Path) -> nn.Module:
    """The quantized model of a QAT checkpoint (``last.pt``/``best.pt``), in eval mode, with its class names.

    The architecture is rebuilt from the checkpoint's model record, quantized with its recipe and loaded
    (:func:`qatkit.apps.stages.load_quantized`); outputs equal those of the model that was saved.

    Args:
        path: a checkpoint written by this integration (or any ultralytics-model checkpoint of qatkit).

    Example:
        >>> qm = load_model("runs/detect/qat/weights/best.pt")  # doctest: +SKIP
        >>> qatkit.export_onnx(qm, (torch.rand(1, 3, 640, 640),), "best.qdq.onnx")  # doctest: +SKIP
    """
    model = load_quantized(path)
    names = read_checkpoint(path, FORMAT)["metadata"].get("names")
    if names:
        model.names = names
    return model
