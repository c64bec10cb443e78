"""Loader for any COCO-format detection dataset (generated shapes or a real one).

The letterboxing, items and the index the evaluator reads live in :mod:`qatkit.apps.data.base`; this module only
reads ``root/annotations/instances_<split>.json`` and finds images under ``root/images/<split>/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from qatkit.apps.data.base import PAD_VALUE, DetectionDataset, collate

__all__ = ["PAD_VALUE", "CocoDetection", "collate"]

_HINT = (
    "Create the generated dataset with qatkit.apps.data.generate_shapes(root) or "
    "`qatkit train-float` (which generates it), or point root at a COCO-format "
    "dataset laid out as root/annotations/instances_<split>.json + root/images/<split>/."
)


class CocoDetection(DetectionDataset):
    """COCO detection dataset yielding letterboxed images and xyxy targets (see :class:`DetectionDataset`).

    Example usage::

        val = CocoDetection("data/shapes", "val", 160)
        image, target = val[0]  # [3,160,160] in [0,1]; target["boxes"] xyxy letterboxed pixels
    """

    _hint = _HINT

    def __init__(
        self,
        root: str | Path,
        split: str,
        img_size: int,
        *,
        augment: bool = False,
        cache: bool = True,
    ) -> None:
        if not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"CocoDetection: img_size must be a positive int, got {img_size!r}")
        super().__init__(split, img_size, augment=augment, cache=cache)
        self.root = Path(root)
        self.img_dir = self.root / "images" / split
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}. {_HINT}")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.img_dir}. {_HINT}")
        try:
            data = json.loads(self.ann_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file} is not valid JSON ({e}); regenerate or repair it.") from e
        self._parse(data, self.ann_file)

    @property
    def ann_file(self) -> Path:
        """Path of the COCO annotation json (ground truth for evaluation)."""
        return self.root / "annotations" / f"instances_{self.split}.json"
