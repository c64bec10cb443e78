"""What every detection loader shares: a COCO-style index of images and boxes, letterboxing, items and batches.

A format (COCO json, ultralytics YOLO txt) only has to build the COCO dict (``images``/``annotations``/
``categories``, boxes in pixels ``[x, y, w, h]``) and say where an image file lies; the letterboxing, the items the
trainer sees and the ground truth the COCO evaluator (:mod:`qatkit.apps.eval.coco_map`) reads are then the same.

Why letterbox: detectors here run at a fixed square input; keeping the aspect ratio and padding bottom/right means a
single scale factor maps boxes back to the original image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

PAD_VALUE = 114  # grey used for letterbox padding (uint8)


def _require(obj: Any, key: str, where: str, source: Any) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(
            f"{source}: {where} is missing required key '{key}'. "
            "Fix the annotation file so it follows the COCO detection format."
        )
    return obj[key]


class DetectionDataset(Dataset):
    """Letterboxed detection images and xyxy targets from a COCO-style dict; subclasses read one file format.

    Category ids (any, non-contiguous) map to labels 0..nc-1 sorted by id;
    ``category_ids[label]`` gives the id back, ``class_names[label]`` its name.
    Item: ``(image float32 [3,S,S] in [0,1], target)`` with target keys
    ``boxes`` (float32 [N,4] xyxy, letterboxed pixels), ``labels`` (int64 [N]),
    ``image_id`` (int), ``scale`` (float, letterboxed / original) and
    ``orig_size`` ((height, width) of the original image).

    A subclass sets ``root``, ``split``, ``img_dir`` (``file_name`` is relative to it) and ``ann_file`` (a COCO json
    holding the dict, the evaluator's ground truth), calls :meth:`_parse` with the dict, and may override ``_hint``.
    """

    _hint = ""  # appended to file-not-found messages: how to get or fix the dataset

    def __init__(self, split: str, img_size: int, *, augment: bool = False, cache: bool = True) -> None:
        if not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"{type(self).__name__}: img_size must be a positive int, got {img_size!r}")
        self.split = split
        self.img_size = img_size
        self.augment = augment
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}

    @property
    def ann_file(self) -> Path:
        """Path of the COCO annotation json (ground truth for evaluation)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _parse(self, data: Any, source: Any) -> None:
        """Index a COCO dict; ``source`` names the file in error messages."""
        f = source
        images = _require(data, "images", "the top-level object", f)
        anns = _require(data, "annotations", "the top-level object", f)
        cats = _require(data, "categories", "the top-level object", f)
        cat_names = {int(_require(c, "id", "a category", f)): str(_require(c, "name", "a category", f)) for c in cats}
        if not cat_names:
            raise ValueError(f"{f}: 'categories' is empty; a detection dataset needs at least one category.")
        self.category_ids: list[int] = sorted(cat_names)
        self.class_names: list[str] = [cat_names[c] for c in self.category_ids]
        label_of = {c: i for i, c in enumerate(self.category_ids)}

        self.images: list[dict[str, Any]] = []
        self._index_of: dict[int, int] = {}
        for im in images:
            rec = {k: _require(im, k, "an image entry", f) for k in ("id", "file_name", "width", "height")}
            rec["id"], rec["width"], rec["height"] = int(rec["id"]), int(rec["width"]), int(rec["height"])
            if rec["width"] < 1 or rec["height"] < 1:
                raise ValueError(f"{f}: image {rec['id']} has non-positive width/height; fix the annotation file.")
            if rec["id"] in self._index_of:
                raise ValueError(f"{f}: duplicate image id {rec['id']}; image ids must be unique.")
            rec["boxes"], rec["labels"] = [], []
            self._index_of[rec["id"]] = len(self.images)
            self.images.append(rec)
        if not self.images:
            raise ValueError(f"{f}: 'images' is empty; nothing to load for split '{self.split}'.")

        for a in anns:
            image_id = int(_require(a, "image_id", "an annotation", f))
            cat = int(_require(a, "category_id", "an annotation", f))
            bbox = _require(a, "bbox", "an annotation", f)
            if a.get("iscrowd", 0):
                continue
            if image_id not in self._index_of:
                raise ValueError(f"{f}: annotation refers to unknown image_id {image_id}; fix the annotation file.")
            if cat not in label_of:
                raise ValueError(f"{f}: annotation refers to unknown category_id {cat}; add it to 'categories'.")
            if len(bbox) != 4:
                raise ValueError(f"{f}: annotation bbox must be [x, y, w, h], got {bbox!r}.")
            x, y, w, h = (float(v) for v in bbox)
            if w < 1 or h < 1:
                continue
            rec = self.images[self._index_of[image_id]]
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, rec["width"]), min(y + h, rec["height"])
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                continue
            rec["boxes"].append((x1, y1, x2, y2))
            rec["labels"].append(label_of[cat])

    def letterbox_scale(self, image_id: int) -> float:
        """letterboxed / original scale of image `image_id` (from the recorded size)."""
        rec = self.image_info(image_id)
        return self.img_size / max(rec["width"], rec["height"])

    def image_info(self, image_id: int) -> dict[str, Any]:
        """The image record (id, file_name, width, height, ...) for `image_id`."""
        if image_id not in self._index_of:
            raise KeyError(f"image_id {image_id} is not in {self.ann_file}")
        return self.images[self._index_of[image_id]]

    @property
    def image_ids(self) -> list[int]:
        return [r["id"] for r in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def _letterboxed(self, i: int) -> np.ndarray:
        """uint8 [S,S,3] letterboxed image, cached after the first read if enabled."""
        if i in self._cache:
            return self._cache[i]
        rec = self.images[i]
        path = self.img_dir / rec["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"Image listed in {self._source} not found: {path}. {self._hint}")
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (rec["width"], rec["height"]):
                raise ValueError(
                    f"{path} is {im.size[0]}x{im.size[1]} but {self._source} says "
                    f"{rec['width']}x{rec['height']}; fix the recorded width/height."
                )
            scale = self.letterbox_scale(rec["id"])
            new_w = max(1, min(self.img_size, round(rec["width"] * scale)))
            new_h = max(1, min(self.img_size, round(rec["height"] * scale)))
            if (new_w, new_h) != im.size:
                im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
            content = np.asarray(im)
        out = np.full((self.img_size, self.img_size, 3), PAD_VALUE, dtype=np.uint8)
        out[:new_h, :new_w] = content
        if self.cache:
            self._cache[i] = out
        return out

    @property
    def _source(self) -> Any:
        """What error messages name as the origin of the image list."""
        return self.ann_file

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as the model sees it at inference (letterboxed, never augmented): for calibration."""
        return torch.from_numpy(self._letterboxed(i)).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        rec = self.images[i]
        img = self._letterboxed(i)
        scale = self.letterbox_scale(rec["id"])
        boxes = torch.tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4) * scale
        labels = torch.tensor(rec["labels"], dtype=torch.int64)
        image = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        if self.augment and bool(torch.rand(()) < 0.5):
            # Flip only the content so padding stays bottom/right and `scale` still maps back.
            new_w = max(1, min(self.img_size, round(rec["width"] * scale)))
            image[:, :, :new_w] = image[:, :, :new_w].flip(-1)
            boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": rec["id"],
            "scale": scale,
            "orig_size": (rec["height"], rec["width"]),
        }
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images to [B,3,S,S]; keep targets as a list (box counts differ)."""
    if not batch:
        raise ValueError("collate got an empty batch; check the DataLoader/sampler settings.")
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
