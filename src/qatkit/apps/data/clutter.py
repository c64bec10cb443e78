"""The hard generated detection set ("clutter"): where quantization visibly costs accuracy, as on COCO.

On ``shapes`` (3 classes, large solid shapes on smooth gradients) INT8 PTQ keeps 99 % of float mAP, so QAT has
nothing to show. ``clutter`` is built to be hard in the ways real scenes are hard for a small INT8 detector:

- 8 classes, two pairs of them alike at small size (circle/hexagon, square/diamond once rotated a little);
- small objects (8-56 px sides at 256 px), up to 14 per image, overlapping (box IoU up to 0.45, later ones occlude);
- low contrast: fill colours only 35-110 RGB units from the local background, some filled with stripes;
- textured backgrounds (sinusoid gratings, checker patches, noise) and unlabelled distractors (lines, blobs, arcs).

Fine colour and edge differences are what 8-bit activations round away. Every image comes from its own RNG seeded by
(seed, split, index), as in :mod:`qatkit.apps.data.shapes`, which writes the files (``generate_shapes(kind="clutter")``).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .shapes import Sample, _rng, place_objects

CLUTTER_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "star", "hexagon", "diamond")
CLUTTER_VERSION = 1  # bump when the rendering changes so cached datasets regenerate

_MIN_SIDE, _MAX_SIDE = 8.0, 56.0  # box side range at the reference size
_REF_SIZE = 256
_MAX_IOU = 0.45
_MAX_OBJECTS = 14
_TRIES = 8


def _textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient plus 1-3 sinusoid gratings, a few checker patches and pixel noise."""
    corners = rng.uniform(30, 225, size=(4, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    u, v = t[None, :, None], t[:, None, None]
    img = (1 - v) * ((1 - u) * corners[0] + u * corners[1]) + v * ((1 - u) * corners[2] + u * corners[3])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        angle, period = rng.uniform(0, np.pi), rng.uniform(4.0, 40.0)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi))
        img += wave[..., None] * rng.uniform(-35, 35, size=3).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.integers(0, size, size=2)
        w, h = rng.integers(size // 8, size // 3, size=2)
        cell = int(rng.integers(3, 10))
        checker = ((yy[y0:y0 + h, x0:x0 + w] // cell + xx[y0:y0 + h, x0:x0 + w] // cell) % 2)[..., None]
        img[y0:y0 + h, x0:x0 + w] += (checker - 0.5) * rng.uniform(-50, 50, size=3).astype(np.float32)
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(rng.uniform(3.0, 12.0))
    return np.clip(img, 0, 255)


def _regular_polygon(n: int, rng: np.random.Generator, radius_ratio: float = 1.0) -> np.ndarray:
    """Unit-box vertices of a regular n-gon (or a 2n-pointed star when radius_ratio < 1), randomly rotated."""
    k = 2 * n if radius_ratio < 1 else n
    angles = rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k
    radius = np.where(np.arange(k) % 2 == 1, radius_ratio, 1.0) if radius_ratio < 1 else np.ones(k)
    pts = np.stack([np.cos(angles) * radius, np.sin(angles) * radius], axis=1)
    pts -= pts.min(axis=0)
    return pts / pts.max()


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, x0: float, y0: float, side: float,
                rng: np.random.Generator) -> None:
    """Draw class ``name`` filling (255) a ``side``-sized box at (x0, y0)."""
    box = [x0, y0, x0 + side - 1, y0 + side - 1]
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        inset = side * rng.uniform(0.22, 0.32)
        draw.ellipse([x0 + inset, y0 + inset, x0 + side - 1 - inset, y0 + side - 1 - inset], fill=0)
    elif name == "square":
        draw.rectangle(box, fill=255)
    elif name == "cross":
        arm = side * rng.uniform(0.28, 0.4)
        lo, hi = (side - arm) / 2, (side + arm) / 2
        draw.rectangle([x0 + lo, y0, x0 + hi - 1, y0 + side - 1], fill=255)
        draw.rectangle([x0, y0 + lo, x0 + side - 1, y0 + hi - 1], fill=255)
    else:
        pts = {"triangle": lambda: _regular_polygon(3, rng), "hexagon": lambda: _regular_polygon(6, rng),
               "star": lambda: _regular_polygon(5, rng, radius_ratio=0.45),
               "diamond": lambda: _regular_polygon(4, rng)}[name]()
        draw.polygon([tuple(p) for p in (pts * (side - 1) + (x0, y0)).tolist()], fill=255)


def _object_mask(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    scale = size / _REF_SIZE
    side = float(np.exp(rng.uniform(np.log(_MIN_SIDE * scale), np.log(_MAX_SIDE * scale))))  # many small ones
    x0, y0 = rng.uniform(-0.15 * side, size - 0.85 * side, size=2)
    canvas = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(canvas), name, float(x0), float(y0), side, rng)
    return np.asarray(canvas) > 0


def _fill(rng: np.random.Generator, local_bg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Colours for the masked pixels: 35-110 RGB units from the local background, sometimes striped."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    colour = np.clip(local_bg + direction * rng.uniform(35, 110), 0, 255)
    n = int(mask.sum())
    if rng.uniform() < 0.3:  # stripes of the colour and a second one
        other = np.clip(local_bg - direction * rng.uniform(20, 60), 0, 255)
        ys, xs = np.nonzero(mask)
        stripe = ((xs + ys) // int(rng.integers(2, 5))) % 2 == 0
        return np.where(stripe[:, None], colour, other)
    return np.broadcast_to(colour, (n, 3))


def _distractors(rng: np.random.Generator, img: np.ndarray) -> None:
    """Unlabelled clutter: lines, irregular blobs and arcs, drawn before the objects."""
    size = img.shape[0]
    canvas = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 9))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([tuple(p) for p in rng.uniform(0, size, size=(2, 2)).tolist()], fill=colour,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:  # irregular blob: 7-11 vertices at random radii
            k = int(rng.integers(7, 12))
            centre, radius = rng.uniform(0, size, size=2), rng.uniform(4, 20) * size / _REF_SIZE
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
            r = radius * rng.uniform(0.4, 1.0, size=k)
            draw.polygon([(float(centre[0] + a * np.cos(t)), float(centre[1] + a * np.sin(t)))
                          for a, t in zip(r, angles)], fill=colour)
        else:
            x0, y0 = rng.uniform(0, size, size=2)
            d = rng.uniform(8, 40) * size / _REF_SIZE
            start = float(rng.uniform(0, 360))
            draw.arc([float(x0), float(y0), float(x0 + d), float(y0 + d)], start, start + float(rng.uniform(60, 200)),
                     fill=colour, width=int(rng.integers(1, 3)))
    img[...] = np.asarray(canvas, dtype=np.float32)


def render_clutter(seed: int, split: str, index: int, img_size: int) -> Sample:
    """Render image ``index`` of ``split`` of the clutter set exactly as ``generate_shapes(kind="clutter")`` writes it.

    Args:
        seed: dataset seed.
        split: ``"train"`` or ``"val"``.
        index: image index within the split.
        img_size: square image side in pixels.

    Example::

        s = render_clutter(0, "val", 3, 256)   # s.image (uint8 HxWx3), s.boxes (COCO xywh), s.labels
    """
    rng = _rng(seed, split, index)
    bg = _textured_background(rng, img_size)
    _distractors(rng, bg)
    img = bg.copy()
    sample = Sample(image=img, background=np.clip(np.rint(bg), 0, 255).astype(np.uint8))
    place_objects(rng, sample, img, bg, int(rng.integers(3, _MAX_OBJECTS + 1)), len(CLUTTER_CLASSES),
                  lambda label: _object_mask(rng, CLUTTER_CLASSES[label], img_size),
                  lambda local, mask: _fill(rng, local, mask), min_side=3, max_iou=_MAX_IOU, tries=_TRIES)
    sample.image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return sample
