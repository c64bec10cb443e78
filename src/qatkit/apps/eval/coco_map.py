"""COCO box mAP with faster-coco-eval, computed in original-image coordinates.

Why original coordinates: mAP must be comparable with published numbers and
between input sizes, so predictions made on the letterboxed image are mapped
back (divide by the letterbox scale, clip) before matching against the
ground-truth json itself, not against the loader's processed copy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

if TYPE_CHECKING:
    from qatkit.apps.data.coco import CocoDetection

Prediction = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # boxes xyxy [K,4], scores [K], labels [K]

METRIC_KEYS: tuple[str, ...] = ("map", "map50", "map75", "mar100")
_STAT_INDEX = {"map": 0, "map50": 1, "map75": 2, "mar100": 8}  # COCOeval.stats layout (bbox)

logger = logging.getLogger(__name__)


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """Swallow faster-coco-eval progress/summary lines."""


def _as_numpy(t: torch.Tensor | np.ndarray, name: str, image_id: int) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    if isinstance(t, np.ndarray):
        return t.astype(np.float64)
    raise TypeError(f"coco_map: {name} for image {image_id} must be a tensor, got {type(t).__name__}")


def _results(dataset: CocoDetection, predictions: dict[int, Prediction]) -> list[dict[str, Any]]:
    """Convert letterboxed, contiguous-label predictions to COCO result dicts."""
    nc = len(dataset.category_ids)
    out: list[dict[str, Any]] = []
    for image_id, pred in predictions.items():
        image_id = int(image_id)
        try:
            info = dataset.image_info(image_id)
        except KeyError:
            raise ValueError(
                f"coco_map: prediction for image_id {image_id}, which is not in {dataset.ann_file}; "
                "key predictions by target['image_id']."
            ) from None
        if len(pred) != 3:
            raise ValueError(f"coco_map: prediction for image {image_id} must be (boxes, scores, labels)")
        boxes = _as_numpy(pred[0], "boxes", image_id).reshape(-1, 4)
        scores = _as_numpy(pred[1], "scores", image_id).reshape(-1)
        labels = _as_numpy(pred[2], "labels", image_id).reshape(-1).astype(np.int64)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"coco_map: image {image_id} has {len(boxes)} boxes, {len(scores)} scores, "
                f"{len(labels)} labels; they must have the same length K."
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= nc):
            raise ValueError(
                f"coco_map: image {image_id} has labels outside 0..{nc - 1}; pass contiguous "
                "labels (dataset label space), not COCO category ids."
            )
        boxes = boxes / dataset.letterbox_scale(image_id)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, info["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, info["height"])
        wh = boxes[:, 2:] - boxes[:, :2]
        for b, s, lab, (w, h) in zip(boxes, scores, labels, wh):
            if w <= 0 or h <= 0:
                continue  # empty after clipping: cannot match anything
            out.append({
                "image_id": image_id,
                "category_id": dataset.category_ids[int(lab)],
                "bbox": [float(b[0]), float(b[1]), float(w), float(h)],
                "score": float(s),
            })
    return out


def coco_map(dataset: CocoDetection, predictions: dict[int, Prediction], *, only_predicted: bool = False
             ) -> dict[str, float]:
    """COCO bbox metrics of `predictions` against `dataset.ann_file`.

    `predictions` maps image_id -> (boxes xyxy [K,4] in the dataset's
    letterboxed pixels, scores [K], labels [K] contiguous).  Every image in the
    json counts, predicted or not.  Returns ``map`` (AP@[.5:.95]), ``map50``,
    ``map75`` and ``mar100`` (AR@100); all 0.0 when there is nothing to match. ``only_predicted``: score only the
    images that have an entry in ``predictions`` (a quick evaluation on part of a dataset).
    """
    results = _results(dataset, predictions)
    zeros = dict.fromkeys(METRIC_KEYS, 0.0)
    if not results:
        return zeros
    gt = COCO(str(dataset.ann_file), print_function=_quiet)
    if not gt.getAnnIds():
        logger.warning("coco_map: %s has no annotations; returning zeros", dataset.ann_file)
        return zeros
    dt = gt.loadRes(results)
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=_quiet)
    if only_predicted:
        ev.params.imgIds = sorted(int(i) for i in predictions)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    # -1 means "no ground truth for this metric"; report that as 0.0.
    return {k: max(0.0, float(ev.stats[i])) for k, i in _STAT_INDEX.items()}
