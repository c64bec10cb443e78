"""`qatkit run` on a user's ultralytics best.pt and data.yaml: the whole pipeline, the summary, kill and --resume."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch

pytest.importorskip("ultralytics")

from qatkit.apps.cli import main  # noqa: E402
from qatkit.apps.stages import load_quantized  # noqa: E402
from qatkit.quantize import quantization_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_KEYS = ("float_map", "ptq_map", "qat_map", "onnx_fp32_map", "onnx_int8_map", "within_one_step", "fp32_ms",
             "int8_ms", "recipe")


def _args(model: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--data", data, "--out", str(out), "--img-size", "64", "--batch", "8",
            "--calib-batches", "2", "--quiet", *extra]


@pytest.fixture(scope="module")
def run_out(tiny_yolo_pt: Path, tiny_yolo_data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(_args(tiny_yolo_pt, tiny_yolo_data, out, "--epochs", "1")) == 0
    return out


def test_summary_has_the_demo_keys_and_agrees(run_out: Path, tiny_yolo_pt: Path, tiny_yolo_data: str) -> None:
    s = json.loads((run_out / "summary.json").read_text())
    assert all(s[k] is not None for k in DEMO_KEYS)
    assert s["model"] == str(tiny_yolo_pt) and s["data"] == tiny_yolo_data and s["recipe"] == "onnxruntime"
    assert s["float_map"] > 0 and s["qat_map"] > 0  # the asserts below compare figures that mean something
    assert abs(s["onnx_fp32_map"] - s["float_map"]) <= 1e-3
    assert s["within_one_step"] >= 0.999
    assert abs(s["onnx_int8_map"] - s["qat_map"]) <= 0.01
    assert s["calibration_seconds"] > 0 and len(s["qat_epoch_seconds"]) == 1
    assert (run_out / "report.html").stat().st_size > 10_000


def test_outputs_reload_and_the_head_decode_stays_float(run_out: Path) -> None:
    qm = load_quantized(run_out / "qat.pt")
    state = quantization_state(qm)
    assert any(".dfl." in layer for layer in state.float_layers)  # the DFL conv of the decode is not quantized
    graph = onnx.load(str(run_out / "model.qdq.onnx")).graph
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    producers = {o: n for n in graph.node for o in n.output}
    dfl = [n for name, n in convs.items() if "dfl" in name.lower()]
    assert dfl and all(producers.get(n.input[1]) is None or producers[n.input[1]].op_type != "DequantizeLinear"
                       for n in dfl)  # its weight is a plain float initializer
    assert load_quantized(run_out / "ptq.pt") is not None
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(qm(x)[0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorrt", "npu-int8-sym", "npu-uint8"])
def test_every_builtin_recipe_runs_unchanged(recipe: str, tiny_yolo_pt: Path, tiny_yolo_data: str,
                                             tmp_path: Path) -> None:
    """The same command with the other built-in recipes (onnxruntime: the module fixture); a short epoch each."""
    extra = ("--recipe", recipe, "--fraction", "0.25", "--epochs", "1")
    assert main(_args(tiny_yolo_pt, tiny_yolo_data, tmp_path, *extra)) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["recipe"] == recipe and s["within_one_step"] >= 0.999
    assert any(".dfl." in layer for layer in quantization_state(load_quantized(tmp_path / "qat.pt")).float_layers)


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tiny_yolo_pt: Path, tiny_yolo_data: str, tmp_path: Path) -> None:
    """A real kill (SIGKILL) during the second QAT epoch, then `--resume`: epoch 2 runs, epoch 1 is not redone."""
    out = tmp_path / "run"
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "qatkit.apps.cli", *_args(tiny_yolo_pt, tiny_yolo_data, out, "--epochs", "2")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "qat" / "weights" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), "the first QAT epoch never wrote last.pt"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()  # killed before the end

    assert main(_args(tiny_yolo_pt, tiny_yolo_data, out, "--epochs", "2", "--resume")) == 0
    rows = list(csv.DictReader((out / "qat" / "results.csv").open()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed"] is True and len(s["qat_epoch_seconds"]) == 1 and s["within_one_step"] >= 0.999


def test_resume_without_a_run_names_the_fix(tiny_yolo_pt: Path, tiny_yolo_data: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    assert main(_args(tiny_yolo_pt, tiny_yolo_data, tmp_path / "none", "--resume")) == 2
    assert "run without --resume" in capsys.readouterr().err


def test_run_needs_a_data_yaml_for_ultralytics_models(tiny_yolo_pt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--model", str(tiny_yolo_pt), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "needs --data path/to/data.yaml" in capsys.readouterr().err
