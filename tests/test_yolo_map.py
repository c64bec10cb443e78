"""yolo_map scores ultralytics YOLO models the way ``yolo val`` does, in PyTorch (float and fake-quant) and as exported
ONNX on ONNX Runtime and OpenVINO; bad data names the fix. Real files, a small model really trained (docs/yolo_map.md).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

import qatkit
from qatkit.apps.data import YoloDetection, generate_shapes
from qatkit.apps.eval.predictors import input_shape, onnx_predictor, torch_predictor
from qatkit.apps.eval.yolo_map import yolo_map
from qatkit.apps.model_source import parse_model
from qatkit.errors import DataError, QatkitError
from test_model_sources import _extra

IMGSZ, BATCH, N_TRAIN, N_VAL = 64, 8, 32, 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_yolo_pt: Path) -> tuple[Path, Path]:
    """(data.yaml, best.pt): 24 val images of the shapes set and the session's weak yolov8n (tests/conftest.py: mAP
    of a few hundredths, with true and false positives at every IoU threshold, so the scores below can disagree)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    _extra("ultralytics")
    tmp = tmp_path_factory.mktemp("yolo-map")
    root = generate_shapes(tmp / "shapes", n_train=N_TRAIN, n_val=N_VAL, img_size=IMGSZ, format="yolo")
    # yolo val gets the absolute root: qatkit and ultralytics read a relative `path` differently (docs/data.md)
    absolute = yaml.safe_load((root / "data.yaml").read_text()) | {"path": str(root.resolve())}
    data = tmp / "data_abs.yaml"
    data.write_text(yaml.safe_dump(absolute))
    return data, tiny_yolo_pt


@pytest.fixture(scope="module")
def float_model(trained: tuple[Path, Path]) -> torch.nn.Module:
    """The checkpoint's model as qatkit loads it (``--model best.pt``): EMA weights, float32, BN not fused."""
    return parse_model(trained[1]).build()


@pytest.fixture(scope="module")
def float_map(trained: tuple[Path, Path], float_model: torch.nn.Module) -> float:
    score = yolo_map(torch_predictor(float_model), trained[0], imgsz=IMGSZ, batch=BATCH, progress=False)
    assert score["images"] == N_VAL and score["map50_95"] > 0.005
    return score["map50_95"]


def _export(model: torch.nn.Module, path: Path, batch: int = 1, **kw) -> Path:
    return qatkit.export_onnx(copy.deepcopy(model), (torch.zeros(batch, 3, IMGSZ, IMGSZ),), path, **kw)


def test_torch_equals_yolo_val(trained: tuple[Path, Path], float_model: torch.nn.Module, float_map: float,
                               tmp_path: Path) -> None:
    from ultralytics import YOLO

    data, best = trained
    val = YOLO(str(best)).val(data=str(data), imgsz=IMGSZ, batch=BATCH, rect=False, plots=False, device="cpu",
                              verbose=False, project=str(tmp_path), name="val")
    # yolo val runs the Conv+BN-fused model (AutoBackend fuses), fp32 on the CPU: score that same model.
    fused = yolo_map(torch_predictor(copy.deepcopy(float_model).fuse()), data, imgsz=IMGSZ, batch=BATCH,
                     progress=False)
    assert abs(fused["map50_95"] - val.box.map) <= 1e-6 and abs(fused["map50"] - val.box.map50) <= 1e-6
    assert fused["images"] == N_VAL and fused["instances"] == int(val.nt_per_class.sum())
    # Unfused (what qatkit quantizes): the same weights up to float rounding of the folded BN.
    assert abs(float_map - val.box.map) <= 1e-3
    # The batch size (and a last partial batch: 24 = 5 * 4 + 4) does not change the figure.
    other_batch = yolo_map(torch_predictor(float_model), data, imgsz=IMGSZ, batch=5, progress=False)
    assert abs(other_batch["map50_95"] - float_map) <= 1e-6


def test_relative_path_and_test_split(trained: tuple[Path, Path], float_model: torch.nn.Module,
                                      float_map: float) -> None:
    """No `path` and `path: .` both resolve to the yaml's folder whatever the working directory; split="test" scores
    `test:`."""
    written = trained[0].parent / "shapes" / "data.yaml"  # as generate_shapes wrote it: no `path` key
    assert "path" not in yaml.safe_load(written.read_text())
    score = yolo_map(torch_predictor(float_model), written, imgsz=IMGSZ, batch=BATCH, progress=False)
    assert score["images"] == N_VAL and abs(score["map50_95"] - float_map) <= 1e-6
    relative = written.with_name("relative.yaml")
    relative.write_text("path: .\n" + written.read_text())
    score = yolo_map(torch_predictor(float_model), relative, imgsz=IMGSZ, batch=BATCH, progress=False)
    assert score["images"] == N_VAL and abs(score["map50_95"] - float_map) <= 1e-6
    with_test = relative.with_name("with_test.yaml")
    with_test.write_text(relative.read_text().replace("val: images/val", "val: images/train\ntest: images/val"))
    score = yolo_map(torch_predictor(float_model), with_test, imgsz=IMGSZ, batch=BATCH, split="test", progress=False)
    assert score["images"] == N_VAL and abs(score["map50_95"] - float_map) <= 1e-6


def test_float_onnx_matches_pytorch(trained: tuple[Path, Path], float_model: torch.nn.Module, float_map: float,
                                    tmp_path: Path) -> None:
    data = trained[0]
    dynamic = _export(float_model, tmp_path / "fp32.onnx")
    ort_map = yolo_map(onnx_predictor(dynamic), data, imgsz=IMGSZ, batch=BATCH, progress=False)["map50_95"]
    assert abs(ort_map - float_map) <= 1e-3
    # A fixed batch of 4 scored in batches of 6 (6 = 4 + 2 padded; 24 = 4 * 6): padding outputs are dropped.
    fixed = _export(float_model, tmp_path / "fp32_b4.onnx", batch=4, dynamic_batch=False)
    assert input_shape(fixed) == [4, 3, IMGSZ, IMGSZ]
    fixed_map = yolo_map(onnx_predictor(fixed), data, imgsz=IMGSZ, batch=6, progress=False)["map50_95"]
    assert abs(fixed_map - ort_map) <= 1e-6
    with pytest.raises(QatkitError, match=r"takes images of \[64, 64\] pixels .* score it at imgsz=64"):
        yolo_map(onnx_predictor(fixed), data, imgsz=2 * IMGSZ, batch=BATCH, progress=False)


def test_quantized_pytorch_and_qdq_onnx_agree(trained: tuple[Path, Path], float_model: torch.nn.Module,
                                              float_map: float, tmp_path: Path) -> None:
    data = trained[0]
    train = YoloDetection(data, "train", IMGSZ)
    batches = [torch.stack([train.image(i) for i in range(start, start + BATCH)]) for start in range(0, 32, BATCH)]
    qm = qatkit.quantize(copy.deepcopy(float_model), "onnxruntime", (batches[0][:1],))
    qatkit.calibrate(qm, batches)
    torch_map = yolo_map(torch_predictor(qm), data, imgsz=IMGSZ, batch=BATCH, progress=False)["map50_95"]
    assert torch_map > 0.005 and torch_map != float_map  # fake-quant ran, and did not wreck the model
    qdq = qatkit.export_onnx(qm, (batches[0][:1],), tmp_path / "model.qdq.onnx")
    ort_map = yolo_map(onnx_predictor(qdq), data, imgsz=IMGSZ, batch=BATCH, progress=False)["map50_95"]
    assert abs(ort_map - torch_map) <= 0.01
    if _has_openvino():
        ov_map = yolo_map(onnx_predictor(qdq, "openvino"), data, imgsz=IMGSZ, batch=BATCH, progress=False)["map50_95"]
        assert abs(ov_map - torch_map) <= 0.01


def _has_openvino() -> bool:
    try:
        _extra("openvino")
    except pytest.skip.Exception:
        return False
    return True


# ---------------------------------------------------------------- bad input (no model needed)


def _never(images: torch.Tensor) -> torch.Tensor:
    raise AssertionError("predict must not run on a dataset that fails its checks")


def test_empty_val_split_names_the_fix(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "shapes", n_train=2, n_val=2, img_size=IMGSZ, format="yolo")
    (root / "images" / "empty").mkdir()
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/empty\nnames: [a, b, c]\n")
    with pytest.raises(DataError, match=r"val split .* has no images .* point val at the image folder"):
        yolo_map(_never, root / "data.yaml", imgsz=IMGSZ, progress=False)


def test_missing_val_split_names_the_fix(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "shapes", n_train=2, n_val=2, img_size=IMGSZ, format="yolo")
    with pytest.raises(DataError, match=r"no split 'test'; this data.yaml has train, val: add a `test:` entry"):
        yolo_map(_never, root / "data.yaml", imgsz=IMGSZ, split="test", progress=False)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [a, b, c]\n")
    with pytest.raises(DataError, match=r"missing required key\(s\) val.* Add them"):
        yolo_map(_never, root / "data.yaml", imgsz=IMGSZ, progress=False)


def test_imgsz_and_output_shape_are_checked(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "shapes", n_train=2, n_val=2, img_size=IMGSZ, format="yolo")
    with pytest.raises(QatkitError, match=r"multiple of 32, got 100.* imgsz=128"):
        yolo_map(_never, root / "data.yaml", imgsz=100, progress=False)

    def two_classes(images: torch.Tensor) -> torch.Tensor:  # 4 + 2 channels for a 3-class dataset
        return torch.zeros(len(images), 6, 84)

    with pytest.raises(QatkitError, match=r"4 \+ 3 classes, anchors\), alone or first, got \(2, 6, 84\).* names="):
        yolo_map(two_classes, root / "data.yaml", imgsz=IMGSZ, progress=False)
