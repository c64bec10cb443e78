"""A generated, learnable detection dataset ("shapes") written in COCO or ultralytics YOLO format.

Why: QAT experiments need a detection task that trains in minutes on a CPU, is
bit-for-bit reproducible and exercises the exact same COCO loader / evaluator
path as a real dataset.  Every image is drawn from its own RNG seeded by
(seed, split, index), so any image can be re-rendered on its own
(:func:`render_sample`) and regenerating gives identical files. The YOLO export
(``format="yolo"``) holds the same images and boxes, so either loader can be
checked against the other (tests/test_yolo_data.py).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")

GENERATOR_VERSION = 1  # bump when the rendering changes so cached datasets regenerate
SPLITS: tuple[str, ...] = ("train", "val")

_MIN_SIDE, _MAX_SIDE = 16.0, 72.0  # box side range at the reference size below
_REF_SIZE = 160
_MAX_IOU = 0.2
_PLACEMENT_TRIES = 10
_MIN_COLOUR_DIST = 100.0  # Euclidean RGB distance from the local background
_VISIBLE_FRACTION = 0.8  # at least this much of each side lies inside the image
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")
_LABEL_NAME = re.compile(r"^\d{6}\.txt$")
FORMATS: tuple[str, ...] = ("coco", "yolo")
KINDS: tuple[str, ...] = ("shapes", "clutter")  # clutter: the hard set, qatkit.apps.data.clutter


@dataclass
class Sample:
    """One rendered image with its tight boxes (xywh, pixels) and 0-based labels."""

    image: np.ndarray  # uint8 [S, S, 3]
    background: np.ndarray  # uint8 [S, S, 3], the image before shapes were drawn
    boxes: list[list[float]] = field(default_factory=list)  # COCO [x, y, w, h]
    labels: list[int] = field(default_factory=list)  # index into CLASSES


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32 (not hash()) so the stream is stable across processes and Python runs.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bilinear gradient between four random corner colours plus mild noise."""
    corners = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    u = t[None, :, None]  # x
    v = t[:, None, None]  # y
    top = (1 - u) * corners[0] + u * corners[1]  # [1, S, 3]
    bottom = (1 - u) * corners[2] + u * corners[3]
    img = (1 - v) * top + v * bottom
    sigma = np.float32(rng.uniform(2.0, 8.0))
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Rasterise one randomly sized and placed shape; returns a bool mask [S, S]."""
    scale = size / _REF_SIZE
    side = rng.uniform(_MIN_SIDE * scale, _MAX_SIDE * scale)
    if CLASSES[label] == "square":
        aspect = rng.uniform(0.7, 1.4)  # w / h; the longer side equals `side`
        w, h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    else:
        w = h = side
    lo = -(1 - _VISIBLE_FRACTION)
    x0 = rng.uniform(lo * w, size - _VISIBLE_FRACTION * w)
    y0 = rng.uniform(lo * h, size - _VISIBLE_FRACTION * h)

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if CLASSES[label] == "circle":
        draw.ellipse([x0, y0, x0 + w - 1, y0 + h - 1], fill=255)
    elif CLASSES[label] == "square":
        draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=255)
    else:  # equilateral triangle, random rotation, scaled so its longer extent == side
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        pts = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        pts -= pts.min(axis=0)
        pts *= (side - 1) / pts.max()
        pts += (x0, y0)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(canvas) > 0


def _mask_box(mask: np.ndarray) -> list[float] | None:
    """Tight COCO box of the drawn pixels (pixel i spans [i, i+1))."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return None
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]


def _iou(a: list[float], b: list[float]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _contrasting_colour(rng: np.random.Generator, local_bg: np.ndarray) -> np.ndarray:
    """Random fill colour far from the local background (best of a few draws)."""
    candidates = rng.integers(0, 256, size=(16, 3))
    dist = np.linalg.norm(candidates - local_bg, axis=1)
    ok = np.flatnonzero(dist > _MIN_COLOUR_DIST)
    return candidates[ok[0] if len(ok) else int(dist.argmax())].astype(np.uint8)


def render_sample(seed: int, split: str, index: int, img_size: int) -> Sample:
    """Render image `index` of `split` exactly as :func:`generate_shapes` writes it."""
    rng = _rng(seed, split, index)
    bg = _background(rng, img_size)
    sample = Sample(image=bg.copy(), background=bg)
    place_objects(rng, sample, sample.image, bg, int(rng.integers(1, 6)), len(CLASSES),
                  lambda label: _shape_mask(rng, label, img_size),
                  lambda local, mask: _contrasting_colour(rng, local), min_side=2, max_iou=_MAX_IOU)
    return sample


def place_objects(rng: np.random.Generator, sample: Sample, img: np.ndarray, bg: np.ndarray, count: int,
                  n_classes: int, mask_of: Callable[[int], np.ndarray],
                  colour_of: Callable[[np.ndarray, np.ndarray], np.ndarray], *, min_side: float, max_iou: float,
                  tries: int = _PLACEMENT_TRIES) -> None:
    """Draw up to ``count`` objects into ``img`` and record their boxes in ``sample``: each gets a random class,
    then up to ``tries`` random shapes (``mask_of(label)``) until one is at least ``min_side`` px and overlaps no
    earlier box by more than ``max_iou``; its pixels get ``colour_of(local background mean, mask)``."""
    for _ in range(count):
        label = int(rng.integers(0, n_classes))
        for _try in range(tries):
            mask = mask_of(label)
            box = _mask_box(mask)
            if box is None or min(box[2], box[3]) < min_side:
                continue
            if any(_iou(box, other) > max_iou for other in sample.boxes):
                continue
            x, y, w, h = (int(v) for v in box)
            img[mask] = colour_of(bg[y : y + h, x : x + w].reshape(-1, 3).mean(axis=0), mask)
            sample.boxes.append(box)
            sample.labels.append(label)
            break


def _kind(kind: str) -> tuple[tuple[str, ...], Callable[[int, str, int, int], Sample], int]:
    """Class names, renderer and generator version of a dataset kind."""
    if kind == "clutter":
        from .clutter import CLUTTER_CLASSES, CLUTTER_VERSION, render_clutter
        return CLUTTER_CLASSES, render_clutter, CLUTTER_VERSION
    return CLASSES, render_sample, GENERATOR_VERSION


def _meta(n_train: int, n_val: int, img_size: int, seed: int, format: str = "coco",
          kind: str = "shapes") -> dict[str, Any]:
    extra = {} if format == "coco" else {"format": format}  # COCO metas keep the identity they always had
    extra |= {} if kind == "shapes" else {"kind": kind}
    classes, _, version = _kind(kind)
    return {
        **extra,
        "generator": "qatkit.data.shapes",  # a stored identity (meta.json), kept from before the move to apps/
        "version": version,
        "classes": list(classes),
        "n_train": n_train,
        "n_val": n_val,
        "img_size": img_size,
        "seed": seed,
    }


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Atomic write: a crash never leaves a truncated file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, separators=None if indent else (",", ":")))
    os.replace(tmp, path)


def _is_complete(root: Path, meta: dict[str, Any]) -> bool:
    meta_file = root / "meta.json"
    try:
        if json.loads(meta_file.read_text()) != meta:
            return False
    except (OSError, ValueError):
        return False
    yolo = meta.get("format") == "yolo"
    if yolo and not (root / "data.yaml").is_file():
        return False
    for split in SPLITS:
        if not yolo and not (root / "annotations" / f"instances_{split}.json").is_file():
            return False
        img_dir, label_dir = root / "images" / split, root / "labels" / split
        for i in range(meta[f"n_{split}"]):
            if not (img_dir / f"{i:06d}.png").is_file() or (yolo and not (label_dir / f"{i:06d}.txt").is_file()):
                return False
    return True


def _remove_stale(folder: Path, pattern: re.Pattern[str], expected: set[str]) -> None:
    """Drop generated files beyond the current count (leftovers of a larger earlier run)."""
    for stale in folder.iterdir():
        if pattern.match(stale.name) and stale.name not in expected:
            stale.unlink()


def _yolo_line(label: int, box: list[float], img_size: int) -> str:
    """``class cx cy w h`` normalised; 6 decimals (as ultralytics writes) keep boxes within 1e-6 * size px."""
    x, y, w, h = box
    return f"{label} {(x + w / 2) / img_size:.6f} {(y + h / 2) / img_size:.6f} {w / img_size:.6f} {h / img_size:.6f}"


def _generate_split(root: Path, split: str, n: int, img_size: int, seed: int, format: str = "coco",
                    kind: str = "shapes") -> None:
    classes, render, _ = _kind(kind)
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(img_dir, _IMAGE_NAME, {f"{i:06d}.png" for i in range(n)})
    label_dir = root / "labels" / split
    if format == "yolo":
        label_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(label_dir, _LABEL_NAME, {f"{i:06d}.txt" for i in range(n)})

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(n):
        s = render(seed, split, i, img_size)
        name = f"{i:06d}.png"
        Image.fromarray(s.image).save(img_dir / name)
        if format == "yolo":
            lines = [_yolo_line(label, box, img_size) + "\n" for box, label in zip(s.boxes, s.labels)]
            (label_dir / f"{i:06d}.txt").write_text("".join(lines))
        images.append({"id": i + 1, "file_name": name, "width": img_size, "height": img_size})
        for box, label in zip(s.boxes, s.labels):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": label + 1,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            })
    if format == "yolo":
        return
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    _write_json(
        root / "annotations" / f"instances_{split}.json",
        {"images": images, "annotations": annotations, "categories": categories},
    )


def generate_shapes(
    root: str | Path,
    *,
    n_train: int = 3000,
    n_val: int = 500,
    img_size: int = 160,
    seed: int = 0,
    format: str = "coco",
    kind: str = "shapes",
) -> Path:
    """Write the shapes dataset under `root` and return `root`.

    ``format="coco"``: ``annotations/instances_{train,val}.json`` + ``images/{train,val}/``.
    ``format="yolo"``: ``images/{train,val}/*.png`` + ``labels/{train,val}/*.txt`` + ``data.yaml`` (load it with
    :class:`~qatkit.apps.data.yolo.YoloDetection` or ``--data root/data.yaml``). Same images and boxes in both.
    ``kind="clutter"``: the hard set of :mod:`qatkit.apps.data.clutter` (8 classes, small low-contrast objects on
    textured backgrounds) instead of the 3 large shapes.

    Returns immediately when `root/meta.json` matches the parameters and all
    files exist.  meta.json is removed first and written last, so an
    interrupted run never looks complete.  Not safe to call concurrently on
    the same root (generate on one process/rank, then load everywhere).
    """
    limits = (("n_train", n_train, 1), ("n_val", n_val, 1), ("img_size", img_size, 32), ("seed", seed, 0))
    for name, value, minimum in limits:
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"generate_shapes: {name} must be an int >= {minimum}, got {value!r}")
    if format not in FORMATS:
        raise ValueError(f"generate_shapes: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if kind not in KINDS:
        raise ValueError(f"generate_shapes: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    root = Path(root)
    meta = _meta(n_train, n_val, img_size, seed, format, kind)
    if _is_complete(root, meta):
        return root

    if format == "coco":
        (root / "annotations").mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").unlink(missing_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        _generate_split(root, split, n, img_size, seed, format, kind)
    if format == "yolo":
        classes = _kind(kind)[0]
        # no `path`: ultralytics and qatkit both take the yaml's folder then (a relative `path` ultralytics reads
        # against the working directory), so the folder can move
        data_yaml = {"train": "images/train", "val": "images/val", "nc": len(classes),
                     "names": dict(enumerate(classes))}
        tmp = root / "data.yaml.tmp"
        tmp.write_text(yaml.safe_dump(data_yaml, sort_keys=False))
        os.replace(tmp, root / "data.yaml")
    _write_json(root / "meta.json", meta, indent=2)
    return root
