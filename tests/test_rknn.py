"""The Rockchip target (issue #20): qatkit's QAT exports compiled by the real rknn-toolkit2 2.5.0 into ``.rknn`` files
and run in its PC simulator, layer by layer and by mAP against PyTorch (docs/targets.md).

The toolkit lives in its own Python (qatkit.targets.rknn_env): ``make test`` builds ``.venv-rknn`` and points
``$QATKIT_RKNN_PYTHON`` at it. Where it is missing these tests skip, except under CI, where they fail.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_ort import batches, make_net

import qatkit
from qatkit.errors import QatkitError
from qatkit.targets import open_runtime, rknn_env
from qatkit.targets.rockchip import compile_rknn

NPU_RECIPES = ["npu-uint8", "npu-int8-sym"]
DEMO_RECIPES = [*NPU_RECIPES, "rknn"]  # rknn: the recipe written for the NPU (src/qatkit/recipes/rknn.yaml)
# The simulator is not bit-exact (docs/targets.md): teacher-forced, nearly every value lands within one step
LAYERWISE = 0.999
MAP_GAP = 0.01  # |simulator mAP - PyTorch mAP| on the small val sets here (measured: <= 0.003 on the demo)


@pytest.fixture(scope="module")
def toolkit() -> Path:
    try:
        return rknn_env.toolkit_python()
    except QatkitError as e:
        if os.environ.get("CI"):  # `make test` builds the toolkit's environment: missing there is a failure
            raise
        pytest.skip(str(e))


# ---------------------------------------------------------------- errors that need no toolkit
def test_a_missing_toolkit_names_the_command_that_installs_it(tmp_path, monkeypatch):
    small = make_net()
    qatkit.quantize(small, "npu-uint8", (batches(0, 1)[0],))
    qatkit.calibrate(small, batches(1, 2), method="max")
    path = qatkit.export_onnx(small, (batches(0, 1)[0],), tmp_path / "m.onnx")
    monkeypatch.setenv(rknn_env.PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(QatkitError, match=r"no Python at .*qatkit targets install rknn"):
        open_runtime(path, "rknn")
    monkeypatch.setenv(rknn_env.PYTHON_ENV, sys.executable)  # a real Python without the toolkit
    with pytest.raises(QatkitError, match=r"rknn-toolkit2 does not import in .*qatkit targets install rknn"):
        compile_rknn(path, tmp_path / "m.rknn")
    assert not (tmp_path / "m.rknn").exists()


def test_unknown_platform_and_options_name_the_valid_ones(tmp_path):
    path = tmp_path / "missing.onnx"
    with pytest.raises(QatkitError, match="unknown rknn platform 'rk9999'; .*rk3588"):
        compile_rknn(path, tmp_path / "m.rknn", platform="rk9999")
    with pytest.raises(QatkitError, match="runtime 'onnxruntime' has no option platform; valid: none"):
        open_runtime(path, "onnxruntime", platform="rk3588")
    with pytest.raises(QatkitError, match="runtime 'rknn' has no option target; valid: platform"):
        open_runtime(path, "rknn", target="rk3588")


# ---------------------------------------------------------------- the demo detector, QAT, both NPU recipes
@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from qatkit.apps.runconfig import RunConfig
    from qatkit.apps.stages import datasets

    cfg = RunConfig(data=tmp_path_factory.mktemp("shapes") / "shapes", n_train=32, n_val=24, calib_batches=2,
                    batch_size=8, qat_steps=4, method="max", quiet=True)
    return cfg, *datasets(cfg)


@pytest.fixture(scope="module", params=DEMO_RECIPES)
def demo_qat(request, demo_data, tmp_path_factory):
    """The shipped demo detector, calibrated and fine-tuned 4 QAT steps under an NPU recipe, exported."""
    from qatkit.apps.runconfig import DEMO_FLOAT
    from qatkit.apps.stages import load_float, ptq, qat

    cfg, train, val = demo_data
    cfg = cfg.model_copy(update={"recipe": request.param})
    qm = qat(cfg, ptq(cfg, load_float(DEMO_FLOAT), train).train(), train).eval()
    path = qatkit.export_onnx(qm, (torch.zeros(1, 3, 160, 160),), tmp_path_factory.mktemp(request.param) / "m.onnx")
    return request.param, qm, path, val


@pytest.mark.slow
def test_demo_qat_export_compiles_to_an_rknn_file(toolkit, demo_qat, tmp_path):
    _, _, path, _ = demo_qat
    out = compile_rknn(path, tmp_path / "deploy" / "model.rknn", platform="rk3588")
    assert out == (tmp_path / "deploy" / "model.rknn").resolve()
    assert out.stat().st_size > 100_000  # weights included (the demo has about 2.4 M parameters)


@pytest.mark.slow
def test_demo_qat_export_runs_in_the_simulator_like_pytorch(toolkit, demo_qat):
    from qatkit.apps.eval.detect import evaluate

    recipe, qm, path, val = demo_qat
    images = [torch.stack([val[i][0] for i in range(j, j + 4)]) for j in (0, 4)]
    report = qatkit.verify(qm, path, images, runtime="rknn", runtime_options={"platform": "rk3588"},
                           metric=lambda predict: evaluate(predict, val, quiet=True)["map"])
    assert report.runtime == "rknn" and report.batches == 2
    assert report.values > 8 * 3 * 160 * 160  # every quantized tensor of every layer was compared
    assert report.within_one_step >= LAYERWISE, (recipe, report.worst_layers)
    # the float outputs (the box decode, which the NPU runs in fp16) have a few values up to ~38 steps off (1/255 of
    # the range each; measured 36.3 under npu-uint8), so the outputs are bounded by share, not by the worst value
    assert report.outputs_within_one_step >= 0.99, (recipe, report.outputs_within_one_step, report.max_steps)
    assert report.torch_map > 0.5, report.torch_map  # the trained detector finds the shapes
    assert abs(report.onnx_map - report.torch_map) <= MAP_GAP, (recipe, report.onnx_map, report.torch_map)
    assert all("simulator" in why for why in report.reasons.values()), report.reasons


@pytest.mark.slow
def test_the_simulator_runs_a_fixed_batch_image_by_image(toolkit, demo_qat, tmp_path):
    """A symbolic batch is compiled at 1; a batch of 3 gives the rows a batch of 1 gives, in order."""
    _, qm, path, val = demo_qat
    rt = open_runtime(path, "rknn")
    assert rt.name == "rknn" and rt.input_names == ["images"] and len(rt.output_names) == rt.n_outputs
    x = torch.stack([val[i][0] for i in range(3)]).numpy()
    together = rt.run({"images": x})
    alone = [rt.run({"images": x[i:i + 1]}) for i in range(3)]
    for k, out in enumerate(together):
        assert out.shape[0] == 3
        np.testing.assert_array_equal(out, np.concatenate([a[k] for a in alone]))
    rt.close()
    fixed = qatkit.export_onnx(qm, (torch.zeros(2, 3, 160, 160),), tmp_path / "b2.onnx", dynamic_batch=False)
    with pytest.raises(QatkitError, match="exported with batch 2 and got 3 images"):
        open_runtime(fixed, "rknn").run({"images": x})


# ---------------------------------------------------------------- an ultralytics YOLOv8n, QAT in its trainer
@pytest.fixture(scope="module", params=NPU_RECIPES)
def yolo_qat(request, tiny_yolo_data, tiny_yolo_pt, tmp_path_factory):
    pytest.importorskip("ultralytics")
    from conftest import TINY_YOLO_RUN
    from ultralytics import YOLO

    from qatkit.integrations.ultralytics import train

    runs = tmp_path_factory.mktemp("rknn-yolo")
    result = train(YOLO(str(tiny_yolo_pt)), data=tiny_yolo_data, recipe=request.param, epochs=1, calib_batches=2,
                   project=str(runs), name="qat", **TINY_YOLO_RUN)
    qm = result.model.eval()
    size = TINY_YOLO_RUN["imgsz"]
    path = qatkit.export_onnx(qm, (torch.zeros(1, 3, size, size),), runs / "qat.qdq.onnx")
    return request.param, qm, path


@pytest.mark.slow
def test_yolov8n_qat_export_compiles_and_runs_in_the_simulator(toolkit, yolo_qat, tiny_yolo_data, tmp_path):
    from conftest import TINY_YOLO_SIZE

    from qatkit.apps.eval.yolo_map import yolo_images

    recipe, qm, path = yolo_qat
    assert compile_rknn(path, tmp_path / "yolov8n.rknn").stat().st_size > 1_000_000
    images = list(yolo_images(tiny_yolo_data, "val", imgsz=TINY_YOLO_SIZE, batch=8))
    report = qatkit.verify(qm, path, images, runtime="rknn")
    assert report.within_one_step >= LAYERWISE, (recipe, report.worst_layers)
    # npu-int8-sym leaves the outputs float: the box decode, which the NPU computes in fp16 (measured 0.983 here)
    assert report.outputs_within_one_step >= (0.97 if recipe == "npu-int8-sym" else 0.99), (recipe, report)


# ---------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def rknn_run(toolkit, tiny_yolo_pt, tiny_yolo_data, tmp_path_factory) -> Path:
    from qatkit.apps.cli import main

    out = tmp_path_factory.mktemp("run-rknn")
    assert main(["run", "--model", str(tiny_yolo_pt), "--data", tiny_yolo_data, "--out", str(out), "--img-size", "64",
                 "--batch", "8", "--calib-batches", "2", "--epochs", "1", "--recipe", "rknn", "--quiet",
                 "--target", "rknn", "--platform", "rk3588"]) == 0
    return out


@pytest.mark.slow
def test_run_with_target_rknn_ends_with_the_rknn_file_and_its_simulator_map(rknn_run):
    import json

    s = json.loads((rknn_run / "summary.json").read_text())
    assert Path(s["rknn_file"]) == (rknn_run / "model.rknn").resolve() and Path(s["rknn_file"]).stat().st_size > 1e6
    assert s["rknn_platform"] == "rk3588" and s["recipe"] == "rknn"
    assert s["rknn_within_one_step"] >= LAYERWISE, s["rknn_worst_layers"]
    assert s["qat_map"] > 0 and abs(s["rknn_int8_map"] - s["qat_map"]) <= MAP_GAP, (s["rknn_int8_map"], s["qat_map"])
    assert "rknn-toolkit2 simulator" in (rknn_run / "report.html").read_text()


@pytest.mark.slow
def test_export_target_rknn_writes_the_qdq_file_and_the_rknn_file(rknn_run, tmp_path, capsys):
    from qatkit.apps.cli import main

    out = tmp_path / "deploy" / "yolo.rknn"
    assert main(["export", "--checkpoint", str(rknn_run / "qat.pt"), "--target", "rknn", "--out", str(out)]) == 0
    assert out.stat().st_size > 1e6 and (tmp_path / "deploy" / "yolo.qdq.onnx").is_file()
    printed = capsys.readouterr().out
    assert f"wrote {out.resolve()}" in printed
    assert main(["export", "--checkpoint", str(rknn_run / "qat.pt"), "--target", "rknn", "--platform", "rk9999",
                 "--out", str(tmp_path / "x.rknn")]) == 2
    assert "unknown rknn platform 'rk9999'" in capsys.readouterr().err and not (tmp_path / "x.qdq.onnx").exists()


def test_targets_list_says_what_runs_here(capsys, monkeypatch, tmp_path):
    from qatkit.apps.cli import main

    monkeypatch.setenv(rknn_env.PYTHON_ENV, str(tmp_path / "python"))
    assert main(["targets", "list"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == {"onnxruntime", "openvino", "rknn"}
    assert lines["onnxruntime"].startswith("ready") and "qatkit targets install rknn" in lines["rknn"]
    assert main(["targets", "install", "tensorrt"]) == 2
    assert "name a target to install (rknn)" in capsys.readouterr().err
