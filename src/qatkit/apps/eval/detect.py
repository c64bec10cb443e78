"""Run any predictor (a PyTorch model or an ONNX Runtime session) over a dataset and score it with COCO mAP.

Both paths share the float decode/NMS of :mod:`qatkit.apps.models.postprocess`, so the comparison isolates the network.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, Subset

from ..data.coco import CocoDetection, collate
from ..models.postprocess import postprocess
from ...progress import progress_bar
from .coco_map import coco_map
from .predictors import Predictor, torch_predictor

__all__ = ["evaluate", "torch_predictor"]


def evaluate(predict: Predictor, dataset: CocoDetection, *, batch_size: int = 32, quiet: bool = True,
             description: str = "eval", limit: int | None = None) -> dict[str, float]:
    """COCO metrics of ``predict`` on ``dataset`` (mAP@0.5:0.95 under ``"map"``); ``limit``: the first N images."""
    predictions = {}
    images = dataset if limit is None else Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, targets in progress_bar(loader, description, quiet):
        for target, det in zip(targets, postprocess(predict(images))):
            predictions[target["image_id"]] = det
    return coco_map(dataset, predictions, only_predicted=limit is not None)
