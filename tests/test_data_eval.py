"""Data (shapes generator, COCO loader) and COCO mAP evaluation, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qatkit.apps.data import CLASSES, CocoDetection, collate, generate_shapes, render_sample
from qatkit.apps.data.coco import PAD_VALUE
from qatkit.apps.eval import coco_map

N_TRAIN, N_VAL, SIZE, SEED = 12, 8, 96, 3


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, seed=SEED)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _gt_predictions(ds: CocoDetection) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    preds = {}
    for i in range(len(ds)):
        _, t = ds[i]
        preds[t["image_id"]] = (t["boxes"], torch.ones(len(t["labels"])), t["labels"])
    return preds


# ---------------------------------------------------------------- generator


def test_generate_layout_and_json(shapes_root: Path) -> None:
    meta = json.loads((shapes_root / "meta.json").read_text())
    assert meta["n_train"] == N_TRAIN and meta["img_size"] == SIZE and meta["seed"] == SEED
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        data = json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in data["categories"]] == list(CLASSES)
        assert [c["id"] for c in data["categories"]] == [1, 2, 3]
        assert len(data["images"]) == n
        for im in data["images"]:
            path = shapes_root / "images" / split / im["file_name"]
            with Image.open(path) as pil:
                assert pil.size == (im["width"], im["height"]) == (SIZE, SIZE)
        per_image: dict[int, int] = {}
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert a["category_id"] in (1, 2, 3) and a["iscrowd"] == 0
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and w >= 2 and h >= 2
            assert a["area"] == pytest.approx(w * h)
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert set(per_image) == {im["id"] for im in data["images"]}  # every image has 1..5 objects
        assert all(1 <= c <= 5 for c in per_image.values())


def test_generate_deterministic_and_fast_path(shapes_root: Path, tmp_path: Path) -> None:
    other = generate_shapes(tmp_path / "b", n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, seed=SEED)
    assert _files(other) == _files(shapes_root)

    mtimes = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    generate_shapes(other, n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, seed=SEED)
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()} == mtimes

    # Different parameters regenerate (and drop images beyond the new count).
    generate_shapes(other, n_train=4, n_val=2, img_size=SIZE, seed=SEED + 1)
    assert json.loads((other / "meta.json").read_text())["seed"] == SEED + 1
    assert len(list((other / "images" / "train").glob("*.png"))) == 4
    assert (other / "images" / "train" / "000000.png").read_bytes() != (
        shapes_root / "images" / "train" / "000000.png"
    ).read_bytes()


def test_incomplete_dataset_is_regenerated(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path, n_train=3, n_val=2, img_size=SIZE)
    (root / "images" / "val" / "000001.png").unlink()
    generate_shapes(root, n_train=3, n_val=2, img_size=SIZE)
    assert (root / "images" / "val" / "000001.png").is_file()


def test_boxes_are_tight(shapes_root: Path) -> None:
    data = json.loads((shapes_root / "annotations" / "instances_train.json").read_text())
    for im in data["images"]:
        s = render_sample(SEED, "train", im["id"] - 1, SIZE)
        with Image.open(shapes_root / "images" / "train" / im["file_name"]) as pil:
            assert np.array_equal(np.asarray(pil.convert("RGB")), s.image)  # file == renderer
        assert s.boxes == [a["bbox"] for a in data["annotations"] if a["image_id"] == im["id"]]
        changed = (s.image != s.background).any(axis=2)
        covered = np.zeros_like(changed)
        for x, y, w, h in (map(int, b) for b in s.boxes):
            covered[y : y + h, x : x + w] = True
            inside = changed[y : y + h, x : x + w]
            # each border row/column of the box touches drawn pixels -> not loose
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert not (changed & ~covered).any()  # no drawn pixel outside every box -> not too small


def test_generate_rejects_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_train"):
        generate_shapes(tmp_path, n_train=0)


# ---------------------------------------------------------------- loader


def test_loader_on_shapes(shapes_root: Path) -> None:
    ds = CocoDetection(shapes_root, "val", 64)
    assert len(ds) == N_VAL and ds.class_names == list(CLASSES) and ds.category_ids == [1, 2, 3]
    img, t = ds[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["scale"] == pytest.approx(64 / SIZE) and t["image_id"] == 1
    assert (t["boxes"] >= 0).all() and (t["boxes"] <= 64).all() and (t["labels"] < 3).all()
    images, targets = collate([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 64, 64) and len(targets) == 3 and targets[2]["image_id"] == 3


def test_loader_flip_augment(shapes_root: Path) -> None:
    plain = CocoDetection(shapes_root, "train", SIZE)
    aug = CocoDetection(shapes_root, "train", SIZE, augment=True, cache=False)
    img0, t0 = plain[1]
    flipped_img = img0.flip(-1)
    b = t0["boxes"]
    flipped_boxes = torch.stack([SIZE - b[:, 2], b[:, 1], SIZE - b[:, 0], b[:, 3]], 1)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        img, t = aug[1]
        if torch.equal(img, img0):
            assert torch.equal(t["boxes"], t0["boxes"])
            seen.add("plain")
        else:
            assert torch.equal(img, flipped_img) and torch.allclose(t["boxes"], flipped_boxes)
            seen.add("flip")
        assert torch.equal(t["labels"], t0["labels"])
    assert seen == {"plain", "flip"}


def _handmade(root: Path, *, drop_key: str | None = None) -> Path:
    """One 200x100 image, categories 7 and 42, plus a crowd and a degenerate box."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)).save(root / "images" / "val" / "a.png")
    data = {
        "images": [{"id": 5, "file_name": "a.png", "width": 200, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 42, "bbox": [10.0, 20.0, 50.0, 40.0], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 7, "bbox": [100.0, 0.0, 100.0, 100.0], "area": 1e4, "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 7, "bbox": [0.0, 0.0, 30.0, 30.0], "area": 900, "iscrowd": 1},
            {"id": 4, "image_id": 5, "category_id": 7, "bbox": [50.0, 50.0, 0.5, 10.0], "area": 5, "iscrowd": 0},
        ],
        "categories": [{"id": 42, "name": "b"}, {"id": 7, "name": "a"}],
    }
    if drop_key:
        del data["annotations"][0][drop_key]
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


def test_letterbox_non_square(tmp_path: Path) -> None:
    ds = CocoDetection(_handmade(tmp_path), "val", 64)
    assert ds.category_ids == [7, 42] and ds.class_names == ["a", "b"]
    img, t = ds[0]
    assert img.shape == (3, 64, 64) and t["image_id"] == 5 and t["scale"] == pytest.approx(0.32)
    assert t["orig_size"] == (100, 200)
    assert torch.equal(t["labels"], torch.tensor([1, 0]))  # crowd + w<1 skipped
    expected = torch.tensor([[10, 20, 60, 60], [100, 0, 200, 100]], dtype=torch.float32) * 0.32
    assert torch.allclose(t["boxes"], expected)
    assert torch.all(img[:, 32:, :] == PAD_VALUE / 255)  # padded bottom (content is 64x32)
    assert not torch.all(img[:, :32, :] == PAD_VALUE / 255)


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"instances_val\.json.*generate_shapes"):
        CocoDetection(tmp_path / "nope", "val", 64)
    with pytest.raises(ValueError, match="'bbox'"):
        CocoDetection(_handmade(tmp_path / "bad", drop_key="bbox"), "val", 64)


# ---------------------------------------------------------------- coco_map


def test_map_perfect_shifted_empty(shapes_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = CocoDetection(shapes_root, "val", 80)  # non-identity scale exercises the mapping back
    preds = _gt_predictions(ds)
    m = coco_map(ds, preds)
    assert m["map"] == pytest.approx(1.0, abs=1e-6) and m["map50"] == pytest.approx(1.0, abs=1e-6)

    shifted = {}
    for k, (b, s, lab) in preds.items():
        size = b[:, 2:] - b[:, :2]
        shifted[k] = (b + 0.3 * torch.cat([size, size], 1), s, lab)
    assert coco_map(ds, shifted)["map"] < 0.6

    # Missing images count against recall.
    half = dict(list(preds.items())[: len(preds) // 2])
    assert coco_map(ds, half)["map"] < 0.9

    assert coco_map(ds, {}) == {"map": 0.0, "map50": 0.0, "map75": 0.0, "mar100": 0.0}
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert coco_map(ds, {1: empty})["map"] == 0.0
    assert capsys.readouterr().out == ""


def test_map_letterboxed_non_square(tmp_path: Path) -> None:
    ds = CocoDetection(_handmade(tmp_path), "val", 64)
    preds = _gt_predictions(ds)
    # The evaluator scores against the unmodified json: the sub-pixel box the loader
    # drops for training still counts as ground truth, so a perfect detector lacks it.
    assert coco_map(ds, preds)["map"] < 1.0
    boxes, scores, labels = preds[5]
    tiny = torch.tensor([[50.0, 50.0, 50.5, 60.0]]) * ds.letterbox_scale(5)
    preds[5] = (torch.cat([boxes, tiny]), torch.ones(3), torch.cat([labels, torch.tensor([0])]))
    assert coco_map(ds, preds)["map"] == pytest.approx(1.0, abs=1e-6)


def test_map_rejects_bad_predictions(shapes_root: Path) -> None:
    ds = CocoDetection(shapes_root, "val", SIZE)
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="contiguous"):
        coco_map(ds, {1: (box, torch.ones(1), torch.tensor([3]))})
    with pytest.raises(ValueError, match="image_id 999"):
        coco_map(ds, {999: (box, torch.ones(1), torch.tensor([0]))})


def test_calibration_batches_do_not_depend_on_the_global_rng(shapes_root: Path) -> None:
    from qatkit.apps.stages import image_batches

    ds = CocoDetection(shapes_root, "train", 64, augment=True)
    torch.manual_seed(1)
    first = list(image_batches(ds, 2, 4, seed=0))
    torch.manual_seed(2)
    second = list(image_batches(ds, 2, 4, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
