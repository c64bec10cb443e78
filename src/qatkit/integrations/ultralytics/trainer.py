"""``QatDetectionTrainer``: ultralytics' ``DetectionTrainer`` training a qatkit-quantized model.

Everything is ultralytics' own (dataloaders, augmentation, loss, optimizer, LR schedule, warm-up, EMA averaging,
validation, early stopping, callbacks, results.csv) except what the subclass overrides:

- ``set_model_attributes``: once the float model is built and on its device, and before ultralytics compiles,
  freezes, wraps (DDP) or copies (EMA) it, the model is quantized in place with the recipe (example input
  1x3ximgszximgsz) and calibrated on the trainer's own data (:mod:`.calibration`). A resumed run's model comes
  quantized from its checkpoint and is not calibrated again.
- ``resume_training``: the EMA becomes a :class:`~.ema.QatModelEMA` (its copy gets hooks of its own; quantizer
  state kept consistent after each average); a resumed run then restores optimizer, EMA, epoch, best fitness.
- ``save_model`` / ``final_eval``: ``last.pt`` / ``best.pt`` are qatkit checkpoints (:mod:`.checkpoints`); the final
  validation runs the quantized EMA with ``best.pt``'s weights.
- ``check_resume`` / ``setup_model``: resume from a qatkit checkpoint, the model rebuilt from its recorded yaml.
- ``_build_train_pipeline``: the model is wrapped in :class:`~.train_step.ImageThenLoss`, so its training forward
  takes the image tensor (the batch dict would feed the wrong tensor to the model-input quantizer).
- ``_setup_ddp`` / ``_setup_train`` / ``_build_train_pipeline``: DDP on CPU with gloo under torchrun
  (:mod:`.cpu_ddp`).

Recipe and calibration settings are a :class:`~.settings.QatSettings`, passed as ``qat=`` or bound to a subclass
with :meth:`QatDetectionTrainer.configured` (ultralytics' ``overrides`` accept only its own keys).
"""
from __future__ import annotations

import shutil
import time
from typing import ClassVar

import torch
from ultralytics.cfg import get_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.checks import check_imgsz

from ...apps.model_source import ModelSource, parse_model
from ...errors import CheckpointError, QatkitError
from ...quantize import quantize
from . import cpu_ddp
from .calibration import CalibrationInfo, calibrate_on_training_data
from .checkpoints import STATE_KEY, drop_optimizer, load_model, read_train_checkpoint, save_checkpoint, train_state
from .ema import QatModelEMA
from .settings import QatSettings
from .train_step import ImageThenLoss

# train arguments a resumed run may change (the rest come from the checkpoint, as in ultralytics' resume)
RESUME_OVERRIDABLE = frozenset({"device", "workers", "batch", "plots", "val", "save_period", "patience", "cache",
                                "close_mosaic", "time"})
CALIBRATE_END = "on_qat_calibrate_end"  # callback event, run on every rank right after calibration


def is_quantized(model: torch.nn.Module) -> bool:
    return getattr(model, "_qatkit", None) is not None


class QatDetectionTrainer(DetectionTrainer):
    """ultralytics' ``DetectionTrainer`` with qatkit quantization, calibration and checkpoints.

    Args:
        cfg: ultralytics' default configuration (as ``DetectionTrainer``).
        overrides: ultralytics train arguments (``data``, ``epochs``, ``imgsz``, ``batch``, ``resume``...).
        _callbacks: ultralytics callbacks (e.g. a ``YOLO`` object's).
        qat: recipe and calibration; default: the class's ``qat_settings``.
        model_source: where the float model came from, recorded in checkpoints; default: parsed from
            ``overrides["model"]``.

    Attributes:
        calibration: :class:`~.calibration.CalibrationInfo` of this run (None when resumed).
        epoch_seconds: seconds of each training epoch's batches (validation and saving excluded).

    Example:
        >>> Trainer = QatDetectionTrainer.configured(recipe="tensorrt", calib_batches=16)  # doctest: +SKIP
        >>> trainer = Trainer(overrides={"model": "best.pt", "data": "data.yaml", "epochs": 10})  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    qat_settings: ClassVar[QatSettings] = QatSettings()

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None, *,
                 qat: QatSettings | None = None, model_source: ModelSource | None = None) -> None:
        self.qat = qat or self.qat_settings
        self.model_source = model_source
        self.calibration: CalibrationInfo | None = None
        self.resumed_calibration: dict | None = None
        self.epoch_seconds: list[float] = []
        self._resume_ckpt: dict | None = None
        self._epoch_start = 0.0
        self._ddp_world = 1  # > 1: CPU DDP under torchrun, driven by this class
        super().__init__(cfg, overrides, _callbacks)
        if self.ddp:
            raise QatkitError(f"device={self.args.device!r} asks ultralytics to spawn DDP workers, which would not "
                              "carry the QAT settings: launch one process per device with torchrun "
                              "--nproc_per_node N instead (qatkit's trainer then joins the group)")
        if self.args.compile:
            raise QatkitError("compile=True is not supported: qatkit's hooks and torch-function mode are untested "
                              "under torch.compile; train with compile=False")
        if self.args.distill_model is not None:
            raise QatkitError("distill_model is not supported by the QAT trainer yet: train without it")
        world = cpu_ddp.torchrun_world()
        if world > 1 and self.device.type == "cpu":
            self._ddp_world = self.world_size = world
            self.args.amp = False  # as ultralytics decides on CPU (check_amp), the same on every rank
        self.add_callback("on_train_epoch_start", _epoch_started)
        self.add_callback("on_train_epoch_end", _epoch_ended)

    @classmethod
    def configured(cls, recipe="onnxruntime", calib_batches: int = 8,
                   calib_method: str | None = None) -> type[QatDetectionTrainer]:
        """A subclass whose default settings are these: pass it where ultralytics takes a trainer class.

        Args:
            recipe: built-in recipe name, YAML path, dict or Recipe.
            calib_batches: calibration steps (global batches).
            calib_method: calibrator override (None: the recipe's).

        Example:
            >>> Trainer = QatDetectionTrainer.configured("npu-int8-sym", calib_batches=4)
            >>> Trainer.qat_settings.recipe_name
            'npu-int8-sym'
        """
        settings = QatSettings(recipe, calib_batches, calib_method)
        return type(cls.__name__, (cls,), {"qat_settings": settings, "__module__": cls.__module__})

    # ------------------------------------------------------------------ resume
    def check_resume(self, overrides: dict) -> None:
        """Resume from a qatkit checkpoint: its train arguments, with only :data:`RESUME_OVERRIDABLE` changed."""
        resume = self.args.resume
        self.resume = bool(resume)
        if not resume:
            return
        if resume is True:
            raise QatkitError("resume=True needs the checkpoint: pass resume='runs/detect/<run>/weights/last.pt'")
        ckpt = read_train_checkpoint(resume)
        args = dict(ckpt["metadata"][STATE_KEY]["train_args"])
        args.update({k: v for k, v in overrides.items() if k in RESUME_OVERRIDABLE})
        ignored = sorted(k for k, v in overrides.items()
                         if k not in RESUME_OVERRIDABLE | {"model", "data", "mode", "resume"} and v != args.get(k))
        if ignored:
            LOGGER.warning(f"qatkit: resume keeps the checkpoint's {ignored}; start a new run to change them")
        if overrides.get("data"):
            args["data"] = overrides["data"]
        args["resume"] = args["model"] = str(resume)
        self.args = get_cfg(args)
        self._resume_ckpt = ckpt
        self.resumed_calibration = ckpt["metadata"][STATE_KEY].get("calibration")
        record = ckpt["metadata"]["model"]
        self.model_source = ModelSource(record["kind"], record.get("spec", ""))
        saved = ckpt["metadata"][STATE_KEY]["qat"]  # the run goes on with its own recipe (its quantizers are saved)
        self.qat = QatSettings(ckpt["recipe"], saved["calib_batches"], saved["calib_method"])

    def setup_model(self):
        """A resumed run's model: rebuilt from the checkpoint's yaml, quantized and loaded (no calibration)."""
        if not self.resume:
            return super().setup_model()
        self.model = load_model(self.args.resume).train()
        return self._resume_ckpt

    def resume_training(self, ckpt) -> None:
        """Replace ultralytics' EMA by a :class:`QatModelEMA`, then restore a resumed run's state."""
        self.ema = QatModelEMA(self.model)  # ultralytics built a plain ModelEMA just before calling this
        if ckpt is None or not self.resume:
            return
        epoch = ckpt["metadata"][STATE_KEY]["epoch"]
        if epoch + 1 >= self.epochs:
            raise CheckpointError(f"{self.args.resume} finished its {self.epochs} epochs: nothing to resume; start a "
                                  "new QAT run from the float model to train longer")
        super().resume_training({**ckpt, "epoch": epoch})

    def _load_checkpoint_state(self, ckpt: dict) -> None:
        state = ckpt["metadata"][STATE_KEY]
        saved = state["optimizer"]
        for group, live in zip(saved["param_groups"], self.optimizer.param_groups):
            group["fused"] = live.get("fused")  # the device of this run picks the kernel, as in ultralytics
        try:
            self.optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"the optimizer state of {self.args.resume} does not fit this model ({e}): "
                                  "resume with the same ultralytics version and optimizer") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.ema.ema.load_state_dict(ckpt["state_dict"])
        self.ema.updates = int(state["ema_updates"])
        self.best_fitness = state["best_fitness"]
        self.stopper.best_fitness = state["stopper"]["best_fitness"]
        self.stopper.best_epoch = state["stopper"]["best_epoch"]

    # ------------------------------------------------------------------ quantization
    def set_model_attributes(self) -> None:
        """ultralytics' attributes, then quantize and calibrate a float model (before compile/freeze/EMA/DDP)."""
        super().set_model_attributes()
        if not is_quantized(self.model):
            self._quantize_and_calibrate()
        if self.model_source is None:
            self.model_source = parse_model(self.args.model)

    def _quantize_and_calibrate(self) -> None:
        self.stride = max(int(self.model.stride.max()), 32)  # what _setup_train sets next; the loaders need it now
        imgsz = check_imgsz(self.args.imgsz, stride=self.stride, floor=self.stride, max_dim=1)
        channels = int(self.data.get("channels", 3))
        example = torch.zeros(1, channels, imgsz, imgsz, device=self.device)
        quantize(self.model, self.qat.recipe, (example,))
        self.model.to(self.device)  # the quantizers are created on the CPU
        self.calibration = calibrate_on_training_data(self, self.model, self.qat)
        self.run_callbacks(CALIBRATE_END)

    # ------------------------------------------------------------------ CPU DDP
    def _setup_ddp(self) -> None:
        if self._ddp_world == 1:
            return super()._setup_ddp()
        cpu_ddp.join_process_group(self._ddp_world)

    def _setup_train(self) -> None:
        # ultralytics wraps DDP (with device_ids, which DDP rejects on CPU) when world_size > 1: it reads 1 here until
        # _build_train_pipeline, where the model is wrapped for CPU and the world size restored
        if self._ddp_world > 1:
            self.world_size = 1
        super()._setup_train()

    def _build_train_pipeline(self) -> None:
        """Wrap the model once (CPU DDP, then :class:`~.train_step.ImageThenLoss`) before loaders and optimizer."""
        if not isinstance(self.model, ImageThenLoss):
            if self._ddp_world > 1:
                self.world_size = self._ddp_world
                self.model = cpu_ddp.wrap(self.model)
            self.model = ImageThenLoss(self.model)
        super()._build_train_pipeline()

    # ------------------------------------------------------------------ checkpoints
    def save_model(self) -> bool:
        """``last.pt`` (with optimizer) and, at a new best fitness, ``best.pt`` (without): qatkit checkpoints."""
        self.wdir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.ema.ema, self.last, self.model_source, train_state(self, optimizer=True))
        if self.best_fitness == self.fitness:
            save_checkpoint(self.ema.ema, self.best, self.model_source, train_state(self, optimizer=False))
        if self.save_period > 0 and self.epoch % self.save_period == 0:
            shutil.copyfile(self.last, self.wdir / f"epoch{self.epoch}.pt")
        return True

    def final_eval(self) -> None:
        """Validate the quantized EMA with ``best.pt``'s weights; drop the optimizer state from ``last.pt``."""
        if RANK in {-1, 0} and self.last.exists():
            drop_optimizer(self.last)
        if not self.best.exists():
            return
        LOGGER.info(f"\nValidating {self.best} (quantized)...")
        self.ema.ema.load_state_dict(read_train_checkpoint(self.best, need_optimizer=False)["state_dict"])
        self.validator.args.plots = self.args.plots
        self.metrics = self.validator(self)
        if self.metrics is not None:
            self.metrics.pop("fitness", None)
        self.epoch += 1  # ultralytics logs the final metrics at step epochs + 1
        self.run_callbacks("on_fit_epoch_end")
        self.epoch -= 1

    def _handle_nan_recovery(self, epoch: int) -> bool:
        try:
            return super()._handle_nan_recovery(epoch)
        except (KeyError, AttributeError, TypeError) as e:  # ultralytics' pickle loader on a qatkit checkpoint
            raise QatkitError(f"the loss or fitness became NaN/Inf at epoch {epoch + 1}, and ultralytics' recovery "
                              f"cannot reload {self.last} (a qatkit checkpoint): it holds the last good epoch, "
                              "resume from it with train(resume=...); if the loss diverges again, start a new run "
                              "with a lower lr0") from e


def _epoch_started(trainer: QatDetectionTrainer) -> None:
    trainer._epoch_start = time.perf_counter()


def _epoch_ended(trainer: QatDetectionTrainer) -> None:
    trainer.epoch_seconds.append(time.perf_counter() - trainer._epoch_start)
