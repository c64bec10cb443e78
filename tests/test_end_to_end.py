"""A short end-to-end run through the CLI stages and the demo, on a small generated dataset.

Uses the shipped float checkpoint (trained on the 160 px shapes set), so mAP figures are real detector figures.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from qatkit.apps import cli
from qatkit.apps.runconfig import DEMO_FLOAT

KEYS = ("float_map", "ptq_map", "qat_map", "onnx_fp32_map", "onnx_int8_map", "within_one_step", "fp32_ms",
        "int8_ms", "recipe")


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = {"data": str(root / "shapes"), "n_train": 48, "n_val": 40, "calib_batches": 2, "batch_size": 8,
           "qat_steps": 4, "latency_runs": 5, "out": str(root / "demo"), "quiet": True}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root


def test_shipped_float_checkpoint_exists():
    assert DEMO_FLOAT.is_file(), "the demo float checkpoint must ship with the package"


@pytest.mark.slow
def test_demo_writes_summary_with_all_keys(run_config, capsys):
    path, root = run_config
    assert cli.main(["demo", "--config", str(path)]) == 0
    summary = json.loads((root / "demo" / "summary.json").read_text())
    assert set(KEYS) <= set(summary)
    assert summary["recipe"] == "onnxruntime"
    assert summary["float_map"] > 0.5  # a real detector, even on 40 images
    assert summary["ptq_map"] > 0.9 * summary["float_map"]
    assert abs(summary["onnx_int8_map"] - summary["qat_map"]) < 0.02
    assert abs(summary["onnx_fp32_map"] - summary["float_map"]) < 1e-3
    assert summary["ort_ops"].get("QLinearConv", 0) > 0 and summary["ort_ops"].get("Conv", 0) == 0
    assert "int8 speed-up" in capsys.readouterr().out
    page = (root / "demo" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # accuracy/latency, sensitivity, histograms
    assert "Quantizers and lint" in page and "nothing to report" in page


def test_report_charts_render(run_config):
    """The PNGs behind the report decode as images with content (a headless render of the charts)."""
    from PIL import Image
    import numpy as np

    _, root = run_config
    for name in ("accuracy", "sensitivity", "histograms"):
        image = np.asarray(Image.open(root / "demo" / f"report_{name}.png").convert("L"))
        assert image.shape[0] > 100 and image.shape[1] > 300
        assert image.std() > 10, name  # not a blank canvas


def test_stages_chain_through_files(run_config, capsys):
    path, root = run_config
    out = root / "stages"
    assert cli.main(["calibrate", "--config", str(path), "--method", "percentile", "--out", str(out / "ptq.pt")]) == 0
    assert cli.main(["qat", "--config", str(path), "--checkpoint", str(out / "ptq.pt"), "--steps", "2",
                     "--out", str(out / "qat.pt")]) == 0
    assert cli.main(["export", "--config", str(path), "--checkpoint", str(out / "qat.pt"),
                     "--out", str(out / "m.onnx")]) == 0
    capsys.readouterr()
    assert cli.main(["verify", "--config", str(path), "--checkpoint", str(out / "qat.pt"),
                     "--onnx", str(out / "m.onnx")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnx_map"] > 0.5 and abs(report["onnx_map"] - report["torch_map"]) < 0.02
    ckpt = torch.load(out / "qat.pt", weights_only=True)
    assert ckpt["metadata"]["stage"] == "qat"


def test_cli_errors_are_clear(run_config, capsys):
    path, root = run_config
    assert cli.main(["calibrate", "--config", str(path), "--recipe", "tensorrtx", "--out", str(root / "x.pt")]) == 2
    assert "unknown recipe 'tensorrtx'" in capsys.readouterr().err
    bad = root / "bad.yaml"
    bad.write_text("qat_stepz: 3\n")
    assert cli.main(["demo", "--config", str(bad)]) == 2
    assert "unknown key 'qat_stepz'" in capsys.readouterr().err
    assert cli.main(["export", "--config", str(path), "--checkpoint", str(root / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_user_recipe_yaml_from_the_cli(run_config, capsys):
    path, root = run_config
    recipe = root / "my_trt.yaml"
    recipe.write_text("base: tensorrt\nrules:\n  - module_name: stem\n    skip: true\n")
    out = root / "user" / "ptq.pt"
    assert cli.main(["calibrate", "--config", str(path), "--recipe", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "stem.conv/weight" not in table and "stage1.0.conv/weight" in table  # stem kept float
    typo = root / "typo.yaml"
    typo.write_text("base: tensorrt\nrules:\n  - module_name: stem\n    skp: true\n")
    assert cli.main(["calibrate", "--config", str(path), "--recipe", str(typo), "--out", str(out)]) == 2
    assert "unknown key 'rules.0.skp'" in capsys.readouterr().err


def test_sensitivity_cli_writes_a_ranking_and_a_keep_float_recipe(run_config, capsys):
    path, root = run_config
    out = root / "sens"
    ptq = root / "sens_ptq.pt"
    assert cli.main(["calibrate", "--config", str(path), "--method", "max", "--out", str(ptq)]) == 0
    assert cli.main(["sensitivity", "--config", str(path), "--checkpoint", str(ptq), "--eval-images", "16",
                     "--only", r"^heads\.0\.cls", "--budget", "1.5", "--out", str(out)]) == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["groups"] and all(g["group"].startswith("heads.0.cls") for g in report["groups"])
    keep = yaml.safe_load((out / "keep_float.yaml").read_text())
    # an unreachable target (1.5x float) keeps every swept group float, each as a skip rule the stages accept
    assert [r["module_name"] for r in keep["rules"]] == report["keep_float"]
    assert len(report["keep_float"]) == len(report["groups"])
    assert "data:image/png;base64," in (out / "sensitivity.html").read_text()
    assert cli.main(["calibrate", "--config", str(path), "--recipe", str(out / "keep_float.yaml"),
                     "--out", str(out / "ptq_kept.pt")]) == 0
    assert "keep_float.yaml" in capsys.readouterr().out
