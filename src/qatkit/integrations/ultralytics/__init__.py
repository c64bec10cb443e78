"""QAT of ultralytics detectors inside ultralytics' own ``DetectionTrainer`` (docs/ultralytics_integration.md).

    from ultralytics import YOLO
    from qatkit.integrations.ultralytics import train, load_model

    result = train(YOLO("runs/detect/train/weights/best.pt"), data="data.yaml", recipe="onnxruntime", epochs=10)
    qm = load_model(result.best)                       # the quantized model, from a weights_only checkpoint
    train(resume=result.last)                          # continue an interrupted run (from its last.pt)

Ultralytics' dataloader, augmentation, loss, optimizer, LR schedule, EMA and validation run unchanged;
:class:`QatDetectionTrainer` quantizes and calibrates the model before ultralytics wraps it, keeps the EMA copy's
quantizers its own, writes qatkit checkpoints and resumes from them, and runs DDP on CPU under ``torchrun``.
Needs ``pip install 'qatkit[apps,ultralytics]'``.
"""
from __future__ import annotations

try:
    import ultralytics  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"qatkit.integrations.ultralytics needs ultralytics ({e}): "
                      "pip install 'qatkit[apps,ultralytics]'") from None

from .calibration import CalibrationInfo  # noqa: E402
from .checkpoints import load_model, read_train_checkpoint  # noqa: E402
from .ema import QatModelEMA  # noqa: E402
from .run import QatResult, train  # noqa: E402
from .settings import QatSettings  # noqa: E402
from .trainer import QatDetectionTrainer  # noqa: E402

__all__ = ["train", "QatResult", "QatDetectionTrainer", "QatSettings", "QatModelEMA", "CalibrationInfo",
           "load_model", "read_train_checkpoint"]
