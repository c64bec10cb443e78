"""Loader for ultralytics' YOLO detection format: a ``data.yaml`` plus one ``class cx cy w h`` txt per image.

The txt labels are turned into the same in-memory COCO dict the COCO loader reads (boxes in pixels ``[x, y, w, h]``,
category id = YOLO class id), so letterboxing, items and the COCO evaluator are shared
(:class:`qatkit.apps.data.base.DetectionDataset`). Paths resolve as ultralytics resolves them (docs/data.md):

- ``path``: the dataset root; relative to the yaml's folder when relative; the yaml's folder when absent.
- ``train`` / ``val``: relative to the root; a folder of images (searched recursively), a ``.txt`` file listing
  image paths (relative ones are relative to the txt's folder), or a list of those.
- the label of ``.../images/.../x.png`` is ``.../labels/.../x.txt`` (the last ``images`` folder in the path becomes
  ``labels``, the suffix ``.txt``). An image without a label file is a background image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from qatkit.apps.data.base import DetectionDataset
from qatkit.errors import DataError

IMAGE_SUFFIXES = frozenset({".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm"})
COORD_TOLERANCE = 1e-3  # normalised coordinates may exceed [0, 1] by this much (rounding when written); clipped
REQUIRED_KEYS = ("train", "val", "names")
SPLITS = ("train", "val", "test")  # test is optional, as in ultralytics

_FORMAT_HELP = "see docs/data.md (ultralytics YOLO format: data.yaml with path, train, val, names)"


def label_path(image: Path) -> Path:
    """The label txt ultralytics reads for ``image``: the last ``/images/`` in the path becomes ``/labels/``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    s = str(image)
    return Path(sb.join(s.rsplit(sa, 1)) if sa in s else s).with_suffix(".txt")


def read_data_yaml(path: str | Path) -> dict[str, Any]:
    """``data.yaml`` as a checked dict: ``root`` (resolved Path), ``train``/``val`` and ``test`` if given (as
    written) and ``names`` (a list, index = class id). Raises :class:`DataError` naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"YOLO data.yaml not found: {path.resolve()}. Point --data at an existing data.yaml "
                        f"(or at a COCO root folder); {_FORMAT_HELP}.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e}); fix the file.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: must be a mapping with keys train, val, names (got {type(data).__name__}); "
                        f"{_FORMAT_HELP}.")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        present = ", ".join(map(str, data)) or "none"
        raise DataError(f"{path}: missing required key(s) {', '.join(missing)}; keys present: {present}. "
                        f"Add them; {_FORMAT_HELP}.")
    names = _names(data["names"], path)
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{path}: nc is {data['nc']!r} but names has {len(names)} entries; make them agree "
                        "(or drop nc).")
    root = Path(data["path"]) if data.get("path") not in (None, "") else Path(".")
    if not root.is_absolute():
        root = path.parent / root
    root = root.resolve()
    if not root.is_dir():
        raise DataError(f"{path}: path {data.get('path')!r} resolves to {root}, which is not a folder. "
                        "Fix `path` (relative paths are relative to the data.yaml's folder).")
    splits = {s: data[s] for s in SPLITS if s in REQUIRED_KEYS or data.get(s) not in (None, "")}
    return {"root": root, **splits, "names": names}


def _names(names: Any, path: Path) -> list[str]:
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DataError(f"{path}: names keys must be integer class ids, got {list(names)}.") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise DataError(f"{path}: names ids must be 0..{len(by_id) - 1} without gaps, got {sorted(by_id)}.")
        names = [by_id[i] for i in range(len(by_id))]
    elif not isinstance(names, list):
        raise DataError(f"{path}: names must be a list or a {{id: name}} mapping, got {type(names).__name__}.")
    if not names:
        raise DataError(f"{path}: names is empty; a detection dataset needs at least one class.")
    return [str(n) for n in names]


def _split_images(spec: Any, root: Path, split: str, yaml_path: Path) -> list[Path]:
    """The image files of a split entry (a folder, a txt list, or a list of those), sorted and de-duplicated."""
    entries = spec if isinstance(spec, list) else [spec]
    found: list[Path] = []
    for entry in entries:
        if not isinstance(entry, (str, os.PathLike)):
            raise DataError(f"{yaml_path}: {split} must be a path or a list of paths, got {entry!r}.")
        p = Path(entry)
        p = (p if p.is_absolute() else root / p).resolve()
        if p.is_dir():
            found += [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
        elif p.is_file() and p.suffix == ".txt":
            for n, line in enumerate(p.read_text().splitlines(), 1):
                line = line.strip()
                if line:
                    f = Path(line)
                    f = (f if f.is_absolute() else p.parent / f).resolve()
                    if not f.is_file():
                        raise DataError(f"{p}:{n}: image {line!r} (resolved {f}) does not exist; fix the list.")
                    found.append(f)
        else:
            raise DataError(f"{yaml_path}: {split} {str(entry)!r} resolves to {p}, which does not exist (or is not "
                            "a folder or a .txt list). Fix the path (relative to the dataset root "
                            f"{root}).")
    return sorted(set(found))


def _parse_label(path: Path, nc: int, width: int, height: int) -> list[tuple[int, list[float]]]:
    """(class, [x, y, w, h] pixels) of each line of a label txt; DataError names the line."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if len(fields) != 5:
            raise DataError(f"{where}: expected 5 fields `class cx cy w h`, got {len(fields)} ({line.strip()!r}); "
                            "segment polygons are not supported, write one box per line.")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(f"{where}: fields must be numbers `class cx cy w h`, got {line.strip()!r}.") from None
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < nc:
            raise DataError(f"{where}: class {fields[0]} is not a class id of names (integers 0..{nc - 1}); "
                            "fix the label or add the class to names in data.yaml.")
        cx, cy, w, h = values[1:]
        if not all(math.isfinite(v) and -COORD_TOLERANCE <= v <= 1 + COORD_TOLERANCE for v in (cx, cy, w, h)):
            raise DataError(f"{where}: coordinates {fields[1:]} are outside [0, 1]; YOLO labels are normalised "
                            "by the image width/height (divide pixel values by them).")
        cx, cy, w, h = (min(max(v, 0.0), 1.0) for v in (cx, cy, w, h))
        out.append((int(cls), [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]))
    return out


def yolo_to_coco(yaml_path: str | Path, split: str) -> tuple[dict[str, Any], Path]:
    """The COCO dict (images, annotations, categories; category id = YOLO class id) of a YOLO split, and the
    dataset root its ``file_name`` entries are relative to (absolute when an image lies outside it)."""
    yaml_path = Path(yaml_path)
    cfg = read_data_yaml(yaml_path)
    if split not in SPLITS or split not in cfg:
        present = ", ".join(s for s in SPLITS if s in cfg)
        fix = (f"add a `{split}:` entry (its images, as for val) or pick one of those" if split in SPLITS else
               f"a data.yaml names only {', '.join(SPLITS)}")
        raise DataError(f"{yaml_path}: no split {split!r}; this data.yaml has {present}: {fix}.")
    root, names = cfg["root"], cfg["names"]
    files = _split_images(cfg[split], root, split, yaml_path)
    if not files:
        raise DataError(f"{yaml_path}: {split} split ({cfg[split]!r}, under {root}) has no images "
                        f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}); point {split} at the image folder.")
    images, annotations, labelled = [], [], 0
    for image_id, f in enumerate(files, 1):
        with Image.open(f) as im:
            width, height = im.size
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        images.append({"id": image_id, "file_name": str(rel), "width": width, "height": height})
        lp = label_path(f)
        if not lp.is_file():
            continue  # a background image, as in ultralytics
        labelled += 1
        for cls, box in _parse_label(lp, len(names), width, height):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    if not labelled:
        raise DataError(f"{yaml_path}: none of the {len(files)} {split} images has a label file (looked for "
                        f"e.g. {label_path(files[0])}). Labels must sit in a 'labels' folder beside 'images' "
                        "with the same relative path and stem (images/val/a.png -> labels/val/a.txt).")
    categories = [{"id": i, "name": n} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}, root


def _write_ground_truth(data: dict[str, Any]) -> Path:
    """The COCO dict as a json in the temp folder, named by its content (the evaluator reads a file; the
    dataset folder may be read-only, and equal content is written once)."""
    text = json.dumps(data, separators=(",", ":"))
    folder = Path(tempfile.gettempdir()) / "qatkit-yolo-gt"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


class YoloDetection(DetectionDataset):
    """An ultralytics YOLO dataset (``data.yaml``) with the COCO loader's interface (see :class:`DetectionDataset`).

    ``category_ids`` are the YOLO class ids 0..nc-1, ``class_names`` the yaml's ``names``; ``ann_file`` is a COCO
    json of the split's ground truth (boxes in pixels) for the COCO evaluator.

    Example usage::

        val = YoloDetection("data/shapes-yolo/data.yaml", "val", 160)
        image, target = val[0]  # as CocoDetection: letterboxed image, xyxy boxes, contiguous labels
    """

    _hint = "Fix the path in data.yaml or restore the image; see docs/data.md."

    def __init__(
        self,
        data_yaml: str | Path,
        split: str,
        img_size: int,
        *,
        augment: bool = False,
        cache: bool = True,
    ) -> None:
        super().__init__(split, img_size, augment=augment, cache=cache)
        self.data_yaml = Path(data_yaml)
        self.coco, self.root = yolo_to_coco(self.data_yaml, split)
        self.img_dir = self.root
        self._ann_file: Path | None = None
        self._parse(self.coco, f"{self.data_yaml} ({split})")

    @property
    def ann_file(self) -> Path:
        """A COCO json of this split's ground truth, written on first use (for the COCO evaluator)."""
        if self._ann_file is None or not self._ann_file.is_file():
            self._ann_file = _write_ground_truth(self.coco)
        return self._ann_file

    @property
    def _source(self) -> Any:
        return f"{self.data_yaml} ({self.split})"
