"""Evaluation: COCO box mAP via faster-coco-eval (:func:`coco_map`), and ultralytics' own mAP of any predictor on a
YOLO dataset (:func:`yolo_map`, docs/yolo_map.md)."""

from qatkit.apps.eval.coco_map import coco_map
from qatkit.apps.eval.yolo_map import yolo_map

__all__ = ["coco_map", "yolo_map"]
