"""Datasets: a generated shapes set (COCO or YOLO files) and loaders for COCO and ultralytics YOLO datasets."""

from qatkit.apps.data.base import DetectionDataset, collate
from qatkit.apps.data.coco import CocoDetection
from qatkit.apps.data.shapes import CLASSES, generate_shapes, render_sample
from qatkit.apps.data.yolo import YoloDetection

__all__ = ["CLASSES", "CocoDetection", "DetectionDataset", "YoloDetection", "collate", "generate_shapes",
           "render_sample"]
