"""``train()``: QAT of a user's ultralytics detector inside ultralytics' trainer, as one Python call.

``YOLO.train(trainer=...)`` cannot be used: it ends by reading ``best.pt`` with ultralytics' pickle loader, which
cannot read qatkit checkpoints. :func:`train` builds the trainer the way ``YOLO.train`` does (the YOLO object's
arguments and callbacks, the float weights loaded into a model built for the dataset's classes), runs it and
returns a :class:`QatResult`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from torch import nn
from ultralytics.engine.model import Model

from ...errors import QatkitError
from .checkpoints import read_train_checkpoint
from .model_input import user_model
from .settings import QatSettings
from .trainer import QatDetectionTrainer

# ultralytics arguments that would fight qatkit: its own QAT (NVIDIA ModelOpt), and arguments train() sets itself
_REJECTED = {"quantize": "quantize=8 is ultralytics' own QAT (NVIDIA ModelOpt): leave it out, qatkit quantizes",
             "model": "pass the model as train()'s first argument", "mode": "train() always trains",
             "resume": "pass resume=<path to last.pt> as train()'s own argument"}


@dataclass
class QatResult:
    """What a QAT run produced.

    Attributes:
        model: the quantized EMA model in eval mode, with ``best.pt``'s weights when one was written (as ultralytics'
            ``YOLO.train`` leaves ``best.pt`` loaded); feed it to ``qatkit.export_onnx`` / ``qatkit.verify``.
        save_dir: the run directory.
        last: ``weights/last.pt`` (None if nothing was saved).
        best: ``weights/best.pt`` (None if never written).
        metrics: the final validation metrics (None on ranks other than 0).
        calibration_seconds: time of quantization's calibration pass (None for a resumed run).
        epoch_seconds: seconds of each QAT epoch's training batches (validation and saving excluded).
    """

    model: nn.Module = field(repr=False)  # required (no default); kept out of the repr
    save_dir: Path
    last: Path | None
    best: Path | None
    metrics: dict | None
    calibration_seconds: float | None
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def mean_epoch_seconds(self) -> float | None:
        """Mean of :attr:`epoch_seconds` (None if no epoch ran)."""
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None

    @classmethod
    def of(cls, trainer: QatDetectionTrainer) -> QatResult:
        calib = trainer.calibration.seconds if trainer.calibration is not None else None
        return cls(trainer.ema.ema.eval(), trainer.save_dir, trainer.last if trainer.last.exists() else None,
                   trainer.best if trainer.best.exists() else None, trainer.metrics, calib, list(trainer.epoch_seconds))


def train(model: Model | nn.Module | str | Path | None = None, *, data: str | Path | None = None,
          recipe: str | Path | dict = "onnxruntime", epochs: int | None = None, calib_batches: int = 8,
          calib_method: str | None = None, bias_correction: bool = False, resume: str | Path | None = None,
          callbacks: dict[str, Callable | list[Callable]] | None = None, **ultralytics_overrides) -> QatResult:
    """QAT-train an ultralytics detector with qatkit inside ultralytics' ``DetectionTrainer``.

    The float model is quantized with ``recipe``, calibrated on ``calib_batches`` batches of the training images
    (validation transforms), then trained by ultralytics' own loop: its dataloader and augmentation, loss, optimizer,
    LR schedule, EMA and validation (of the quantized EMA). ``weights/last.pt`` and ``best.pt`` are qatkit
    checkpoints (``torch.load(weights_only=True)``; :func:`load_model` reads them). Under ``torchrun`` on CPU, every
    rank runs this same call and trains with DDP over gloo.

    Args:
        model: ``YOLO("best.pt")`` (or any detection ``YOLO`` object), its float ``DetectionModel``, or a path to an
            ultralytics ``.pt`` or model yaml. With ``resume`` the model comes from the checkpoint (a YOLO object
            passed anyway contributes its callbacks only).
        data: the dataset yaml (default: the one the YOLO object was trained on, if it records one).
        recipe: qatkit recipe: ``onnxruntime``, ``tensorrt``, ``npu-int8-sym``, ``npu-uint8``, a YAML path or a
            dict.
        epochs: QAT epochs (ultralytics' default otherwise).
        calib_batches: calibration steps, each one global batch of ``batch`` images.
        calib_method: calibrator override for every activation quantizer (None: the recipe's).
        bias_correction: :func:`qatkit.correct_bias` after calibration (under DDP each rank measures its own
            batches; DDP's broadcast of module state when it wraps the model should give every rank rank 0's
            shifts, not tested).
        resume: ``weights/last.pt`` of an unfinished run: continues from its next epoch with its recipe, quantizer
            state, weights, EMA and optimizer (no recalibration); its train arguments apply, except ``device``,
            ``workers``, ``batch``, ``plots``, ``val``, ``save_period``, ``patience``, ``cache``, ``close_mosaic`` and
            ``time``, which may be passed again.
        callbacks: ``{event: function or list of functions}`` added to the trainer's callbacks (ultralytics' events,
            plus ``on_qat_calibrate_end``, run on every rank right after calibration); a YOLO object's own callbacks
            apply too.
        **ultralytics_overrides: any ultralytics train argument (``imgsz``, ``batch``, ``lr0``, ``device``,
            ``project``, ``name``, ``workers``, ``plots``...), except ``quantize`` and ``compile``.

    Returns:
        A :class:`QatResult`.

    Raises:
        QatkitError: a model that is not a float ultralytics detection model, a missing ``data``, an argument that
            conflicts with qatkit; CheckpointError: a ``resume`` file that is not a resumable qatkit QAT checkpoint.

    Example:
        >>> from ultralytics import YOLO
        >>> from qatkit.integrations.ultralytics import train
        >>> result = train(YOLO("runs/detect/train/weights/best.pt"), data="data.yaml", recipe="onnxruntime",
        ...                epochs=10, imgsz=640, batch=16)  # doctest: +SKIP
        >>> result.best  # doctest: +SKIP
        PosixPath('runs/detect/train2/weights/best.pt')
    """
    for key, why in _REJECTED.items():
        if key in ultralytics_overrides:
            raise QatkitError(f"train() does not take {key}=: {why}")
    created_group = not (dist.is_available() and dist.is_initialized())
    try:
        settings = QatSettings(recipe, calib_batches, calib_method, bias_correction)
        trainer = _trainer(model, data, settings, epochs, resume, ultralytics_overrides)
        for event, functions in (callbacks or {}).items():
            for fn in functions if isinstance(functions, (list, tuple)) else [functions]:
                trainer.add_callback(event, fn)
        trainer.train()
        return QatResult.of(trainer)
    finally:
        if created_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # the group this call joined (CPU DDP under torchrun)


def _trainer(model: object, data: str | Path | None, settings: QatSettings, epochs: int | None,
             resume: str | Path | None, overrides: dict) -> QatDetectionTrainer:
    args = dict(overrides)
    if epochs is not None:
        args["epochs"] = epochs
    if resume is not None:
        read_train_checkpoint(resume)  # a clear error before ultralytics starts
        if data is not None:
            args["data"] = str(data)
        callbacks = model.callbacks if isinstance(model, Model) else None  # the model itself comes from the file
        return QatDetectionTrainer(overrides={**args, "resume": str(resume)}, _callbacks=callbacks, qat=settings)
    if model is None:
        raise QatkitError("train() needs model= (YOLO('best.pt'), a DetectionModel or a path), or resume=<last.pt>")
    um = user_model(model)
    data = data or um.overrides.get("data")
    if not data:
        raise QatkitError("train() needs data=: the dataset yaml to train on (e.g. data='coco8.yaml')")
    base = {k: v for k, v in um.overrides.items() if k not in ("resume", "mode")}
    trainer = QatDetectionTrainer(overrides={**base, "model": um.source.spec or None, "task": "detect", **args,
                                             "data": str(data), "mode": "train"},
                                  _callbacks=um.callbacks, qat=settings, model_source=um.source)
    trainer.model = trainer.get_model(cfg=um.model.yaml, weights=um.model if um.pretrained else None)
    return trainer
