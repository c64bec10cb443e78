"""The hard generated set (kind="clutter"): reproducible, valid YOLO files that ultralytics and qatkit read alike."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from qatkit.apps.data import YoloDetection, generate_shapes
from qatkit.apps.data.clutter import CLUTTER_CLASSES, render_clutter

N_TRAIN, N_VAL, SIZE = 12, 6, 128


@pytest.fixture(scope="module")
def clutter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("clutter"), n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE,
                           format="yolo", kind="clutter")


def test_render_is_deterministic_and_boxes_are_valid() -> None:
    a, b = render_clutter(5, "val", 7, SIZE), render_clutter(5, "val", 7, SIZE)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes and a.labels == b.labels
    assert not np.array_equal(a.image, render_clutter(5, "val", 8, SIZE).image)
    for i in range(20):
        s = render_clutter(0, "train", i, SIZE)
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.boxes) == len(s.labels)
        for (x, y, w, h), label in zip(s.boxes, s.labels):
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and min(w, h) >= 3
            assert 0 <= label < len(CLUTTER_CLASSES)


def test_yolo_files_and_data_yaml(clutter: Path) -> None:
    data = yaml.safe_load((clutter / "data.yaml").read_text())
    assert "path" not in data  # the yaml's folder: ultralytics and qatkit agree, and the folder can move
    assert data["names"] == dict(enumerate(CLUTTER_CLASSES)) and data["nc"] == 8
    ds = YoloDetection(clutter / "data.yaml", "val", SIZE)
    assert len(ds) == N_VAL and ds.class_names == list(CLUTTER_CLASSES)
    for i in range(N_VAL):
        expected = render_clutter(0, "val", i, SIZE)
        _, target = ds[i]
        assert target["labels"].tolist() == expected.labels
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in expected.boxes]
        assert np.allclose(target["boxes"].numpy(), np.array(xyxy, dtype=np.float32).reshape(-1, 4), atol=1e-3)


def test_clutter_and_shapes_do_not_share_a_cache(clutter: Path) -> None:
    """Regenerating the same root as the other kind replaces it (meta.json names the kind), never mixes them."""
    generate_shapes(clutter, n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, format="yolo", kind="shapes")
    assert len(yaml.safe_load((clutter / "data.yaml").read_text())["names"]) == 3
    generate_shapes(clutter, n_train=N_TRAIN, n_val=N_VAL, img_size=SIZE, format="yolo", kind="clutter")
    assert len(yaml.safe_load((clutter / "data.yaml").read_text())["names"]) == 8
    with pytest.raises(ValueError, match="kind must be one of shapes, clutter"):
        generate_shapes(clutter, kind="coco-like")
