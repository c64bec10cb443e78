"""Evaluation: COCO box mAP via faster-coco-eval."""

from qatkit.apps.eval.coco_map import coco_map

__all__ = ["coco_map"]
