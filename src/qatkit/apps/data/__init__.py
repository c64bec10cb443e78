"""Datasets: a generated COCO-format shapes set and a generic COCO loader."""

from qatkit.apps.data.coco import CocoDetection, collate
from qatkit.apps.data.shapes import CLASSES, generate_shapes, render_sample

__all__ = ["CLASSES", "CocoDetection", "collate", "generate_shapes", "render_sample"]
