"""What ``train(model, ...)`` accepts: a ``YOLO`` object, a float ``DetectionModel``, or a path or yaml name.

Each becomes a :class:`UserModel`: the float ``DetectionModel`` to start from, the :class:`ModelSource` its
checkpoints record (:mod:`qatkit.apps.model_source`), the ultralytics arguments the model carries, and the ``YOLO``
object's callbacks. Anything else is a :class:`QatkitError` that names the accepted forms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from ultralytics.engine.model import Model
from ultralytics.nn.tasks import DetectionModel

from ...errors import QatkitError
from ...apps.model_source import PT, YAML, ModelSource, infer_source, parse_model

FORMS = ("a YOLO object (YOLO('best.pt'), YOLO('yolov8n.yaml')), its float DetectionModel (YOLO(...).model), or a "
         "path: an ultralytics checkpoint written by `yolo train` (best.pt) or a model yaml (yolov8n.yaml)")


@dataclass
class UserModel:
    """The float model a QAT run starts from and what the run records about it."""

    model: DetectionModel
    source: ModelSource
    overrides: dict = field(default_factory=dict)  # ultralytics arguments the YOLO object carries (data, imgsz...)
    callbacks: dict | None = None  # the YOLO object's callbacks (None: ultralytics' defaults)
    pretrained: bool = True  # False for a model built from a yaml only: its weights are random


def _check_detection(model: nn.Module, what: str) -> DetectionModel:
    if getattr(model, "_qatkit", None) is not None:
        raise QatkitError(f"{what} is already quantized by qatkit: pass the float model to start a QAT run, or "
                          "resume=<run>/weights/last.pt to continue one")
    if type(model) is not DetectionModel:
        kind = type(model).__name__
        raise QatkitError(f"{what} is a {kind}, not an ultralytics DetectionModel: QatDetectionTrainer trains "
                          f"detection models (task 'detect') only; pass {FORMS}")
    return model


def user_model(model: object) -> UserModel:
    """Resolve what the user passed as ``model`` into a :class:`UserModel`.

    Args:
        model: ``YOLO(...)``, a float ``DetectionModel``, or a ``str``/``Path`` to a ``.pt`` or model yaml.

    Raises:
        QatkitError: anything else, a non-detection model, or a model already quantized by qatkit.

    Example:
        >>> um = user_model(YOLO("runs/detect/train/weights/best.pt"))  # doctest: +SKIP
        >>> um.source.kind
        'ultralytics-pt'
    """
    if isinstance(model, Model):
        if model.task != "detect":
            raise QatkitError(f"the YOLO object's task is {model.task!r}: only 'detect' models are supported")
        inner = _check_detection(model.model, "the YOLO object's model")
        if model.ckpt_path:
            source = ModelSource(PT, str(model.ckpt_path))
        else:
            source = ModelSource(YAML, str(model.cfg or inner.yaml.get("yaml_file", "")))
        return UserModel(inner, source, dict(model.overrides), model.callbacks, bool(model.ckpt_path))
    if isinstance(model, nn.Module):
        inner = _check_detection(model, "model")
        return UserModel(inner, infer_source(inner))
    if isinstance(model, (str, Path)):
        source = parse_model(model)
        if source.kind not in (PT, YAML):
            raise QatkitError(f"model {str(model)!r} is not an ultralytics model; pass {FORMS}")
        inner = _check_detection(source.build(), f"model {str(model)!r}")
        return UserModel(inner, source, {"model": str(model)}, None, source.kind == PT)
    raise QatkitError(f"model must be {FORMS}; got a {type(model).__qualname__}")
