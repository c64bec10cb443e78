"""Fixtures shared by the ultralytics tests: a tiny YOLO-format dataset and a user's float ``best.pt`` trained on it
by plain ultralytics (one epoch at 64 px), built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

TINY_YOLO_SIZE = 64
TINY_YOLO_RUN = dict(imgsz=TINY_YOLO_SIZE, batch=8, workers=0, plots=False, device="cpu", exist_ok=True,
                     verbose=False)


@pytest.fixture(scope="session")
def tiny_yolo_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shapes set in YOLO format (32 train, 16 val images at 64 px): its data.yaml, with an absolute path."""
    from qatkit.apps.data import generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=16, img_size=TINY_YOLO_SIZE,
                           format="yolo")
    spec = yaml.safe_load((root / "data.yaml").read_text())
    (root / "abs.yaml").write_text(yaml.safe_dump({**spec, "path": str(root)}))
    return str(root / "abs.yaml")


@pytest.fixture(scope="session")
def tiny_yolo_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's ``best.pt``: ``YOLO("yolov8n.yaml")`` trained by plain ultralytics from scratch for 20 epochs on 256
    other 64-px shapes images (seed 1). Weak (mAP@0.5:0.95 of a few hundredths on :func:`tiny_yolo_data`'s val
    images) but with true and false positives at every IoU threshold, so figures compared in tests can disagree."""
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    from qatkit.apps.data import generate_shapes

    tmp = tmp_path_factory.mktemp("float-yolo")
    root = generate_shapes(tmp / "shapes", n_train=256, n_val=8, img_size=TINY_YOLO_SIZE, seed=1, format="yolo")
    YOLO("yolov8n.yaml").train(data=str(root / "data.yaml"), epochs=20, imgsz=TINY_YOLO_SIZE, batch=16,
                               optimizer="SGD", lr0=0.02, seed=0, workers=0, plots=False, val=False, amp=False,
                               device="cpu", verbose=False, project=str(tmp / "runs"), name="train", exist_ok=True)
    return tmp / "runs" / "train" / "weights" / "best.pt"
