"""mAP of any predictor on an ultralytics YOLO dataset, computed by ultralytics' own ``DetectionValidator``.

Same data loading (letterbox to a fixed ``imgsz`` x ``imgsz``, ``rect=False``), same ``preprocess`` (uint8 RGB ->
float [0, 1]), same NMS (``postprocess``: conf 0.001, IoU 0.7, max_det 300, multi-label), same matching
(``update_metrics``) and same mAP@0.5:0.95 (``get_stats``) as ``yolo val``: only the forward pass is the caller's, so
a PyTorch model, a qatkit fake-quant model and an exported ONNX file are scored alike. docs/yolo_map.md says under
which settings the figure equals ``yolo val``'s and how much ``yolo val``'s default ``rect=True`` moves it.

The data.yaml is checked by qatkit's YOLO loader first (:func:`qatkit.apps.data.yolo.yolo_to_coco`: keys, paths,
every label line), so a bad dataset is a :class:`qatkit.DataError` naming the fix; ultralytics then reads exactly
the images qatkit found (a temporary list of their absolute paths), with paths resolved as docs/data.md says.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ...errors import QatkitError
from ...progress import progress_bar
from ..data.yolo import yolo_to_coco
from .predictors import Predictor

STRIDE = 32  # the input multiple of YOLO detectors (P3-P5 heads); yolo val rounds imgsz up to it


def yolo_map(predict: Predictor, data_yaml: str | Path, *, imgsz: int, batch: int = 16, split: str = "val",
             names: Sequence[str] | dict[int, str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Box metrics of ``predict`` on a split of a YOLO dataset, as ``yolo val`` computes them (``rect=False``).

    Args:
        predict: ``images -> outputs``: a float batch ``(B, 3, imgsz, imgsz)`` in [0, 1], RGB, gives the decoded
            detections ``(B, 4 + nc, anchors)`` (boxes cx, cy, w, h in input pixels, then class scores), alone or as
            the first element of a tuple/list (an ultralytics ``DetectionModel`` in eval mode, the first output of
            its ONNX export). See :mod:`qatkit.apps.eval.predictors`.
        data_yaml: an ultralytics data.yaml (docs/data.md).
        imgsz: the square input size, a multiple of 32 (a fixed-size ONNX file's size).
        batch: images per ``predict`` call; the last batch may be smaller (``onnx_predictor`` pads it).
        split: the data.yaml key to score (``val``, ``test``, ...).
        names: the model's class names (list or {id: name}); default the data.yaml's. Fewer names than the dataset
            has classes drops the other classes' labels, as ``yolo val`` does for such a model.
        progress: show a progress bar.

    Returns:
        ``map50_95`` (mAP@0.5:0.95, ``yolo val``'s ``metrics.box.map``), ``map50``, ``map75``, ``precision``,
        ``recall`` (mean over classes), ``images``, ``instances``, ``per_class_map50_95`` ({name: AP}).

    Raises:
        qatkit.DataError: the data.yaml, the split or a label is unusable (the message names the fix).
        QatkitError: ``imgsz`` is not a multiple of 32, or ``predict`` returns another shape than
            ``(B, 4 + nc, anchors)``.

    Example:
        >>> from qatkit.apps.eval.predictors import onnx_predictor, torch_predictor
        >>> yolo_map(torch_predictor(YOLO("best.pt").model), "data.yaml", imgsz=640)["map50_95"]
        >>> yolo_map(onnx_predictor("model.qdq.onnx"), "data.yaml", imgsz=640)["map50_95"]
    """
    _check_imgsz(imgsz)
    with tempfile.TemporaryDirectory(prefix="qatkit-yolo-map-") as tmp:
        data = _ultralytics_data(data_yaml, split, Path(tmp))
        class_names = _names(names) if names is not None else data["names"]
        validator = _validator(data, split, imgsz, batch, class_names, Path(tmp))
        loader = validator.dataloader
        with torch.no_grad():
            for images in progress_bar(loader, f"yolo mAP ({split})", quiet=not progress):
                images = validator.preprocess(images)
                decoded = _decoded(predict(images["img"]), len(images["img"]), len(class_names))
                validator.update_metrics(validator.postprocess(decoded), images)
        validator.get_stats()
    box = validator.metrics.box
    return {
        "map50_95": float(box.map), "map50": float(box.map50), "map75": float(box.map75),
        "precision": float(box.mp), "recall": float(box.mr), "images": int(validator.seen),
        "instances": int(validator.metrics.nt_per_class.sum()),
        "per_class_map50_95": {class_names[int(c)]: float(ap) for c, ap in zip(box.ap_class_index, box.ap)},
    }


def yolo_images(data_yaml: str | Path, split: str, *, imgsz: int, batch: int = 16,
                limit: int | None = None) -> Iterator[torch.Tensor]:
    """Image batches of a split as ``yolo val`` feeds them (letterboxed, float [0, 1]): calibration or verify input.

    Args:
        data_yaml: an ultralytics data.yaml (checked as :func:`yolo_map` checks it).
        split: the data.yaml key (``train`` for calibration, ``val`` for verify).
        imgsz: the square input size, a multiple of 32.
        batch: images per batch.
        limit: stop after this many batches (``None``: the whole split, in file order).

    Example:
        >>> qatkit.calibrate(qm, yolo_images("data.yaml", "train", imgsz=640, limit=16))
    """
    _check_imgsz(imgsz)
    with tempfile.TemporaryDirectory(prefix="qatkit-yolo-images-") as tmp:
        data = _ultralytics_data(data_yaml, split, Path(tmp))
        validator = _validator(data, split, imgsz, batch, data["names"], Path(tmp))
        for i, images in enumerate(validator.dataloader):
            if limit is not None and i >= limit:
                return
            yield validator.preprocess(images)["img"]


def _check_imgsz(imgsz: int) -> None:
    if not isinstance(imgsz, int) or imgsz <= 0 or imgsz % STRIDE:
        raise QatkitError(f"imgsz must be a positive multiple of {STRIDE}, got {imgsz!r}: yolo val rounds it up to "
                          f"one, so pass imgsz={-(-int(imgsz) // STRIDE) * STRIDE} to score what yolo val scores")


def _names(names: Sequence[str] | dict[int, str]) -> dict[int, str]:
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else dict(enumerate(map(str, names)))


def _ultralytics_data(data_yaml: str | Path, split: str, tmp: Path) -> dict[str, Any]:
    """The dataset dict ultralytics' ``check_det_dataset`` would build, from qatkit's checked reading: the split is a
    txt list of the absolute paths of the images qatkit validated (raises DataError on any problem)."""
    coco, root = yolo_to_coco(data_yaml, split)  # every check of docs/data.md: keys, paths, empty split, labels
    image_list = tmp / f"{split}.txt"
    image_list.write_text("".join(f"{root / im['file_name']}\n" for im in coco["images"]))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return {"yaml_file": str(data_yaml), "path": root, split: str(image_list), "names": names, "nc": len(names),
            "channels": 3}


def _validator(data: dict[str, Any], split: str, imgsz: int, batch: int, names: dict[int, str], save_dir: Path):
    """A ``DetectionValidator`` set up as ``yolo val`` sets it up for a CPU run, dataloader and metrics ready."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.models.yolo.detect import DetectionValidator

    args = {"task": "detect", "mode": "val", "data": data["yaml_file"], "imgsz": imgsz, "batch": batch,
            "split": split, "rect": False, "plots": False, "save_json": False, "workers": 0, "device": "cpu",
            "verbose": False}
    validator = DetectionValidator(save_dir=save_dir, args=args)
    validator.training = False  # standalone validation (e.g. raises max_det to the most objects in an image)
    validator.device, validator.data, validator.stride, validator.names = torch.device("cpu"), data, STRIDE, names
    validator.dataloader = validator.get_dataloader(data[split], batch)
    validator.init_metrics(SimpleNamespace(names=names, end2end=False))
    return validator


def _decoded(outputs: torch.Tensor | Sequence[torch.Tensor], n: int, nc: int) -> torch.Tensor:
    """The decoded detections ``(n, 4 + nc, anchors)`` among ``predict``'s outputs (the first one), float32."""
    decoded = outputs if isinstance(outputs, torch.Tensor) else outputs[0] if len(outputs) else None
    if not isinstance(decoded, torch.Tensor) or decoded.ndim != 3 or decoded.shape[:2] != (n, 4 + nc):
        got = tuple(decoded.shape) if isinstance(decoded, torch.Tensor) else type(decoded).__name__
        raise QatkitError(f"predict must return the decoded detections (batch {n}, 4 + {nc} classes, anchors), alone "
                          f"or first, got {got}: pass an ultralytics DetectionModel (eval mode) or its ONNX export, "
                          "and names= with the model's classes if they differ from the data.yaml's")
    return decoded.float()
