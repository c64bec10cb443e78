"""The ultralytics YOLO loader (data.yaml + txt labels), on real files: errors, round trip with COCO, evaluator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from qatkit.apps.data import CLASSES, CocoDetection, YoloDetection, generate_shapes
from qatkit.apps.data.yolo import label_path
from qatkit.apps.eval import coco_map
from qatkit.apps.runconfig import RunConfig
from qatkit.errors import DataError

N_TRAIN, N_VAL, SIZE, SEED = 6, 5, 96, 3


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same shapes set as COCO and as YOLO files."""
    kw = dict(n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, seed=SEED)
    coco = generate_shapes(tmp_path_factory.mktemp("coco"), **kw)
    yolo = generate_shapes(tmp_path_factory.mktemp("yolo"), format="yolo", **kw)
    return coco, yolo


def _dataset(root: Path, *, labels: dict[str, str] | None = None, yaml_text: str | None = None,
             sizes: tuple[int, int] = (200, 100)) -> Path:
    """A hand-made YOLO set: images/{train,val}/{a,b}.png (w x h = sizes), labels as given (default one box each)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem in ("a", "b"):
            pixels = rng.integers(0, 256, (sizes[1], sizes[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{stem}.png")
    default = {f"{s}/a": "1 0.175 0.4 0.25 0.4\n0 0.75 0.5 0.5 1.0\n" for s in ("train", "val")}
    for key, text in (default if labels is None else labels).items():
        (root / "labels" / f"{key}.txt").write_text(text)
    text = yaml_text if yaml_text is not None else "path: .\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n"
    (root / "data.yaml").write_text(text)
    return root / "data.yaml"


# ---------------------------------------------------------------- good data


def test_handmade_loads(tmp_path: Path) -> None:
    ds = YoloDetection(_dataset(tmp_path), "val", 64)
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"] and ds.category_ids == [0, 1]
    img, t = ds[0]  # a.png: two boxes; b.png has no label file (a background image)
    assert img.shape == (3, 64, 64) and t["scale"] == pytest.approx(0.32) and t["orig_size"] == (100, 200)
    assert torch.equal(t["labels"], torch.tensor([1, 0]))
    expected = torch.tensor([[10, 20, 60, 60], [100, 0, 200, 100]], dtype=torch.float32) * 0.32
    assert torch.allclose(t["boxes"], expected, atol=1e-4)
    assert ds[1][1]["boxes"].shape == (0, 4)
    gt = ds.coco["annotations"]
    assert np.allclose([a["bbox"] for a in gt], [[10, 20, 50, 40], [100, 0, 100, 100]])


def test_names_dict_absolute_path_and_txt_list(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "set")
    (tmp_path / "set" / "val.txt").write_text("./images/val/a.png\nimages/val/b.png\n")
    other = tmp_path / "elsewhere" / "data.yaml"
    other.parent.mkdir()
    other.write_text(yaml.safe_dump({"path": str(data.parent), "train": "images/train", "val": "val.txt",
                                     "nc": 2, "names": {0: "cat", 1: "dog"}}))
    ds = YoloDetection(other, "val", 64)
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"]
    assert [r["file_name"] for r in ds.images] == ["images/val/a.png", "images/val/b.png"]


def test_shapes_yolo_export_matches_coco(shapes: tuple[Path, Path]) -> None:
    coco_root, yolo_root = shapes
    assert yaml.safe_load((yolo_root / "data.yaml").read_text())["names"] == dict(enumerate(CLASSES))
    for split in ("train", "val"):
        c, y = CocoDetection(coco_root, split, SIZE), YoloDetection(yolo_root / "data.yaml", split, SIZE)
        assert len(c) == len(y) and c.class_names == y.class_names == list(CLASSES)
        for i in range(len(c)):
            (ci, ct), (yi, yt) = c[i], y[i]
            assert torch.equal(ci, yi)  # same pixels
            assert torch.equal(ct["labels"], yt["labels"])
            assert torch.allclose(ct["boxes"], yt["boxes"], atol=1e-3)  # 6 decimals: far under a pixel


def test_shapes_yolo_deterministic_and_fast_path(shapes: tuple[Path, Path], tmp_path: Path) -> None:
    _, yolo_root = shapes
    again = generate_shapes(tmp_path, n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, seed=SEED, format="yolo")
    files = {str(p.relative_to(yolo_root)): p.read_bytes() for p in sorted(yolo_root.rglob("*")) if p.is_file()}
    assert files == {str(p.relative_to(again)): p.read_bytes() for p in sorted(again.rglob("*")) if p.is_file()}
    assert not (again / "annotations").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    generate_shapes(again, n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, seed=SEED, format="yolo")
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == mtimes
    with pytest.raises(ValueError, match="format must be one of coco, yolo"):
        generate_shapes(tmp_path / "x", format="voc")


def test_datasets_picks_the_loader(shapes: tuple[Path, Path]) -> None:
    from qatkit.apps.stages import datasets

    coco_root, yolo_root = shapes
    train, val = datasets(RunConfig(data=yolo_root / "data.yaml", img_size=64))
    assert isinstance(train, YoloDetection) and isinstance(val, YoloDetection)
    assert train.augment and not val.augment and len(val) == N_VAL
    train, val = datasets(RunConfig(data=coco_root, img_size=64, n_train=N_TRAIN, n_val=N_VAL, seed=SEED))
    assert isinstance(val, CocoDetection) and len(val) == N_VAL


def test_map_of_ground_truth_is_one(shapes: tuple[Path, Path], tmp_path: Path) -> None:
    for ds in (YoloDetection(shapes[1] / "data.yaml", "val", 80), YoloDetection(_dataset(tmp_path), "val", 64)):
        preds = {}
        for i in range(len(ds)):
            _, t = ds[i]
            preds[t["image_id"]] = (t["boxes"], torch.ones(len(t["labels"])), t["labels"])
        m = coco_map(ds, preds)
        assert m["map"] == pytest.approx(1.0, abs=1e-6) and m["map50"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- errors


def _raises(data_yaml: Path, *fragments: str, split: str = "val") -> str:
    with pytest.raises(DataError) as info:
        YoloDetection(data_yaml, split, 64)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_yaml_errors(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.yaml", "not found", str(tmp_path / "nope.yaml"))
    d = _dataset(tmp_path / "list", yaml_text="- a\n- b\n")
    _raises(d, "must be a mapping", str(d))
    d = _dataset(tmp_path / "keys", yaml_text="path: .\ntrain: images/train\nnc: 2\n")
    _raises(d, "missing required key(s) val, names", "keys present: path, train, nc")
    d = _dataset(tmp_path / "nc", yaml_text="train: images/train\nval: images/val\nnc: 3\nnames: [cat, dog]\n")
    _raises(d, "nc is 3 but names has 2")


def test_missing_paths_print_the_resolved_path(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "p", yaml_text="path: ../gone\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    _raises(d, "path '../gone'", str(tmp_path / "gone"))
    d = _dataset(tmp_path / "v", yaml_text="train: images/train\nval: images/valid\nnames: [a, b]\n")
    _raises(d, "val 'images/valid'", str(tmp_path / "v" / "images" / "valid"))
    d = _dataset(tmp_path / "t", yaml_text="train: imgs/train\nval: images/val\nnames: [a, b]\n")
    _raises(d, "train 'imgs/train'", str(tmp_path / "t" / "imgs" / "train"), split="train")


@pytest.mark.parametrize(("line", "fragments"), [
    ("0 0.5 0.5 0.2", ["a.txt:2", "expected 5 fields", "got 4"]),
    ("0 0.5 0.5 0.2 0.2 0.9", ["a.txt:2", "expected 5 fields", "got 6"]),
    ("0 0.5 zero 0.2 0.2", ["a.txt:2", "must be numbers"]),
    ("2 0.5 0.5 0.2 0.2", ["a.txt:2", "class 2", "0..1"]),
    ("-1 0.5 0.5 0.2 0.2", ["a.txt:2", "class -1", "0..1"]),
    ("0.5 0.5 0.5 0.2 0.2", ["a.txt:2", "class 0.5"]),
    ("0 50 40 20 20", ["a.txt:2", "outside [0, 1]", "normalised"]),
    ("0 0.5 1.02 0.2 0.2", ["a.txt:2", "outside [0, 1]"]),
])
def test_bad_label_lines(tmp_path: Path, line: str, fragments: list[str]) -> None:
    d = _dataset(tmp_path, labels={"val/a": f"1 0.5 0.5 0.2 0.2\n{line}\n"})
    _raises(d, str(tmp_path / "labels" / "val" / "a.txt"), *fragments)


def test_coordinates_within_tolerance_are_clipped(tmp_path: Path) -> None:
    d = _dataset(tmp_path, labels={"val/a": "0 0.5 0.5 1.0004 1.0\n"})
    _, t = YoloDetection(d, "val", 64)[0]
    assert torch.allclose(t["boxes"], torch.tensor([[0.0, 0.0, 64.0, 32.0]]), atol=1e-4)


def test_empty_split_and_unlabelled_split(tmp_path: Path) -> None:
    d = _dataset(tmp_path / "e")
    for f in (tmp_path / "e" / "images" / "val").iterdir():
        f.unlink()
    _raises(d, "val split", "has no images")
    d = _dataset(tmp_path / "u", labels={"train/a": "0 0.5 0.5 0.2 0.2\n"})
    msg = _raises(d, "none of the 2 val images has a label file")
    assert str(tmp_path / "u" / "labels" / "val" / "a.txt") in msg


def test_label_path_follows_ultralytics() -> None:
    assert label_path(Path("/d/images/val/x.y.jpg")) == Path("/d/labels/val/x.y.txt")
    assert label_path(Path("/images/d/images/sub/a.png")) == Path("/images/d/labels/sub/a.txt")
    assert label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")
