"""``--model`` sources (docs/models.md): each form builds a model, a checkpoint rebuilds it from its own metadata
alone, and every bad input names the problem and the fix."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import yaml
from torch import nn

import qatkit
from qatkit.apps import cli, stages
from qatkit.apps.model_source import DEMO, FACTORY, PT, YAML, ModelSourceError, parse_model
from qatkit.apps.models.detector import DetectorConfig, TinyYolo
from qatkit.capture import tensors_of
from qatkit.errors import CheckpointError

SIZE = 64


def _extra(name: str):
    """An optional extra; CI installs all of them, so there a missing one fails instead of skipping."""
    if os.environ.get("CI"):
        return __import__(name)
    return pytest.importorskip(name)


def _ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    _extra("ultralytics")
    from ultralytics.nn.tasks import DetectionModel
    return DetectionModel


def _yolo_pt(path, *, ema: bool = True) -> nn.Module:
    """A checkpoint laid out as ultralytics' BaseTrainer.save_model writes one (engine/trainer.py)."""
    model = _ultralytics()("yolov8n.yaml", verbose=False)
    half = copy.deepcopy(model).half()
    torch.save({"epoch": 3, "best_fitness": 0.5, "stopper": {"best_fitness": 0.5, "best_epoch": 2},
                "model": None if ema else half, "ema": half if ema else None, "updates": 12, "modelopt": None,
                "optimizer": None, "scaler": None, "train_args": {"imgsz": SIZE}, "train_metrics": {},
                "train_results": {}, "date": "2025-01-01", "version": "8.4.0"}, path)
    return half


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def tiny():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))\n\n"
        "def not_a_module():\n    return {'weights': 1}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


def _calibrated(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    qatkit.quantize(model, "onnxruntime", (torch.zeros(1, 3, SIZE, SIZE),))
    qatkit.calibrate(model, [torch.rand(2, 3, SIZE, SIZE, generator=g)], method="max", quiet=True)
    return model.eval()


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ta, tb in zip(tensors_of(a(x)), tensors_of(b(x)), strict=True):
            assert torch.equal(ta, tb)


# -- each form builds a model ------------------------------------------------------------------------------------

def test_demo_is_the_default():
    assert parse_model(None).kind == parse_model("demo").kind == DEMO
    assert isinstance(parse_model("demo").build(), TinyYolo)


def test_qatkit_float_checkpoint_as_model_is_the_demo_detector(tmp_path):
    path = stages.save_float(TinyYolo(DetectorConfig()), tmp_path / "f.pt")
    source = parse_model(str(path))
    assert source.kind == DEMO and isinstance(source.build(), TinyYolo)


def test_factory_builds_a_module(factory_module):
    source = parse_model(f"{factory_module}:tiny")
    assert source.kind == FACTORY
    assert isinstance(source.build(), nn.Sequential)


def test_ultralytics_yaml_builds_offline():
    DetectionModel = _ultralytics()
    source = parse_model("yolov8n.yaml")
    assert source.kind == YAML
    model = source.build()
    assert isinstance(model, DetectionModel) and not model.training
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("ema", [True, False])
def test_ultralytics_pt_loads_ema_else_model_as_float32(tmp_path, ema):
    saved = _yolo_pt(tmp_path / "best.pt", ema=ema)
    source = parse_model(str(tmp_path / "best.pt"))
    assert source.kind == PT
    model = source.build()
    assert isinstance(model, _ultralytics()) and next(model.parameters()).dtype == torch.float32
    for k, v in saved.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.float()), k
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # not fused: qatkit folds BN itself


# -- a checkpoint rebuilds its model from its own metadata --------------------------------------------------------

@pytest.mark.parametrize("form", ["yaml", "pt"])
def test_ultralytics_checkpoint_round_trips_from_the_path_alone(tmp_path, form):
    if form == "pt":
        _yolo_pt(tmp_path / "best.pt")
        spec = str(tmp_path / "best.pt")
    else:
        _ultralytics()
        spec = "yolov8n.yaml"
    source = parse_model(spec)
    qm = _calibrated(source.build())
    path = stages.save_quantized(qm, tmp_path / "ptq.pt", "ptq", source)
    if form == "pt":
        (tmp_path / "best.pt").unlink()  # self-contained: the architecture is in the qatkit checkpoint
    record = torch.load(path, weights_only=True)["metadata"]["model"]
    assert record["kind"] == source.kind and record["spec"] == spec and record["yaml"]["backbone"]
    _same_outputs(qm, stages.load_quantized(path))


def test_factory_checkpoint_round_trips(tmp_path, factory_module):
    source = parse_model(f"{factory_module}:tiny")
    qm = _calibrated(source.build())
    path = stages.save_quantized(qm, tmp_path / "ptq.pt", "ptq", source)
    _same_outputs(qm, stages.load_quantized(path))


def test_demo_checkpoint_without_a_model_source_still_loads(tmp_path):
    qm = _calibrated(TinyYolo(DetectorConfig()))
    path = qatkit.save(qm, tmp_path / "old.pt", metadata={"stage": "ptq",
                                                           "detector_config": stages.config_dict(qm)})
    loaded = stages.load_quantized(path)
    assert isinstance(loaded, TinyYolo)
    _same_outputs(qm, loaded)


def test_cli_calibrate_a_yaml_model_then_export_with_the_checkpoint_only(tmp_path, capsys):
    _ultralytics()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(tmp_path / "shapes"), "n_train": 4, "n_val": 2, "img_size": SIZE,
                                   "calib_batches": 1, "batch_size": 2, "quiet": True, "model": "yolov8n.yaml"}))
    assert cli.main(["calibrate", "--config", str(cfg), "--method", "max", "--out", str(tmp_path / "p.pt")]) == 0
    assert cli.main(["export", "--checkpoint", str(tmp_path / "p.pt"), "--data", str(tmp_path / "shapes"),
                     "--out", str(tmp_path / "m.onnx"), "--config", str(cfg)]) == 0
    assert (tmp_path / "m.onnx").is_file()
    assert cli.main(["demo", "--config", str(cfg)]) == 2
    assert "demo detector only" in capsys.readouterr().err


# -- bad input names the problem and the fix ---------------------------------------------------------------------

def test_malformed_spec_lists_the_accepted_forms(tmp_path):
    with pytest.raises(ModelSourceError, match="accepted forms: demo .*yolov8n.yaml.*package.module:factory"):
        parse_model("yolov8n")

def test_cli_names_a_bad_model(capsys):
    assert cli.main(["demo", "--model", "not a model"]) == 2
    assert "accepted forms" in capsys.readouterr().err


def test_factory_errors(factory_module):
    with pytest.raises(ModelSourceError, match="cannot import module 'no_such_pkg.nets'"):
        parse_model("no_such_pkg.nets:build").build()
    with pytest.raises(ModelSourceError, match="module 'my_nets' has no callable 'missing'"):
        parse_model("my_nets:missing").build()
    with pytest.raises(ModelSourceError, match=r"not_a_module\(\) returned a dict .* not a torch.nn.Module"):
        parse_model("my_nets:not_a_module").build()


def test_pt_that_is_no_known_checkpoint(tmp_path):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"neither an ultralytics nor a qatkit checkpoint: found a dict with "
                                              r"keys \['weight', 'bias'\].*factory"):
        parse_model(str(tmp_path / "sd.pt"))
    _ultralytics()
    torch.save({"ema": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="found a dict with keys \\['ema'\\] whose model is a "
                                              "torch.nn.modules.linear.Linear"):
        parse_model(str(tmp_path / "pickled.pt")).build()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="neither an ultralytics nor a qatkit checkpoint: torch.load failed"):
        parse_model(str(tmp_path / "junk.pt")).build()
    with pytest.raises(CheckpointError, match="does not exist"):
        parse_model(str(tmp_path / "missing.pt"))


def test_quantized_checkpoint_as_model_points_to_checkpoint(tmp_path, factory_module):
    source = parse_model(f"{factory_module}:tiny")
    path = stages.save_quantized(_calibrated(source.build()), tmp_path / "q.pt", "ptq", source)
    with pytest.raises(CheckpointError, match="quantized qatkit checkpoint .* pass it as --checkpoint"):
        parse_model(str(path))


def test_yaml_ultralytics_cannot_build(tmp_path):
    _ultralytics()
    bad = tmp_path / "broken.yaml"
    bad.write_text("nc: 3\nbackbone: [[-1, 1, NoSuchBlock, [16, 3, 2]]]\nhead: []\n")
    with pytest.raises(ModelSourceError, match="ultralytics cannot build a model from .*broken.yaml"):
        parse_model(str(bad)).build()


def test_ultralytics_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics.nn", None)
    with pytest.raises(ModelSourceError, match=r"pip install 'qatkit\[ultralytics\]'"):
        parse_model("yolov8n.yaml").build()
