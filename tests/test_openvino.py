"""verify on OpenVINO as well as ONNX Runtime (issue #11): the runtime contract, the layer-wise check in integer codes
on OpenVINO, and the metric callable computed both ways. Real torch, ONNX Runtime and OpenVINO; see docs/openvino.md.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_ort import batches, make_net
from test_int16 import zero_point_types

import qatkit
from qatkit.errors import QatkitError
from qatkit.targets import RUNTIMES, open_runtime

if os.environ.get("CI"):  # CI installs every extra: there a missing OpenVINO fails instead of skipping
    import openvino  # noqa: F401
else:
    pytest.importorskip("openvino")

RECIPES = ["onnxruntime", "tensorrt"]
# OpenVINO 2026.4.1 computes the signed-int8 (tensorrt) export of the demo detector wrongly, and the same grid written
# unsigned exactly (docs/openvino.md). The test asserts the signed file still diverges, so a fixed OpenVINO shows up.
OPENVINO_SIGNED_DIVERGES = {"tensorrt"}
CPU_RUNTIMES = [r for r in RUNTIMES if r != "rknn"]  # the NPU simulator's contract is tested in test_rknn.py


@dataclass
class Exported:
    net: torch.nn.Module
    path: Path
    data: list[torch.Tensor]
    unsigned_path: Path | None = None  # the same model exported with unsigned_activations=True


def _export(net: torch.nn.Module, recipe: str, calib: list[torch.Tensor], folder: Path) -> Path:
    qatkit.quantize(net, recipe, (calib[0][:1],))
    qatkit.calibrate(net, calib, method="max")
    return qatkit.export_onnx(net, (calib[0][:1],), folder / f"{recipe}.onnx")


@pytest.fixture(scope="module", params=RECIPES)
def small(request, tmp_path_factory) -> Exported:
    net = make_net()
    path = _export(net, request.param, batches(1, 4), tmp_path_factory.mktemp("small"))
    # a batch of 2 (dynamic batch axis) and out-of-range inputs that exercise clipping
    return Exported(net, path, batches(5, 1, batch=2) + batches(6, 1, lo=-0.5, hi=1.8))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from qatkit.apps.data import CocoDetection, generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=8, img_size=160, seed=0)
    train = CocoDetection(root, "train", 160)
    return torch.stack([train.image(i) for i in range(8)]), CocoDetection(root, "val", 160)


@pytest.fixture(scope="module", params=RECIPES)
def demo(request, shapes, tmp_path_factory) -> Exported:
    """The demo detector from its shipped float checkpoint, calibrated on 8 shapes images (max: fast)."""
    from qatkit.apps.runconfig import DEMO_FLOAT
    from qatkit.apps.stages import load_float

    images, val = shapes
    net = load_float(DEMO_FLOAT)
    folder = tmp_path_factory.mktemp("demo")
    path = _export(net, request.param, [images[:4], images[4:]], folder)
    unsigned = qatkit.export_onnx(net, (images[:1],), folder / f"{request.param}.u8.onnx", unsigned_activations=True)
    return Exported(net, path, [torch.stack([val[i][0] for i in range(8)])], unsigned)


def _recipe(exported: Exported) -> str:
    return exported.path.stem.split(".")[0]


# ---------------------------------------------------------------- the runtime contract
@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_runtime_outputs_follow_the_onnx_graph(small, runtime):
    rt = open_runtime(small.path, runtime, threads=1)
    assert rt.name == runtime and rt.input_names == ["images"]
    import onnx

    assert rt.output_names == [o.name for o in onnx.load(str(small.path)).graph.output]
    x = small.data[0]
    out = rt.run({"images": x.numpy()})
    assert len(out) == rt.n_outputs == 1 and out[0].shape == (2, 6, 16, 16)
    predicted = rt.predictor()(x)
    assert isinstance(predicted[0], torch.Tensor)
    np.testing.assert_array_equal(predicted[0].numpy(), out[0])


def test_openvino_defaults_to_f32_even_where_the_cpu_has_bf16(small):
    import openvino as ov

    rt = open_runtime(small.path, "openvino")
    assert rt.precision == "f32"
    assert str(rt.compiled.get_property("INFERENCE_PRECISION_HINT")) == str(ov.Type.f32)
    bf16 = open_runtime(small.path, "openvino", precision="bf16")
    assert str(bf16.compiled.get_property("INFERENCE_PRECISION_HINT")) == str(ov.Type.bf16)


def test_unknown_runtime_and_precision_name_the_valid_ones(small):
    with pytest.raises(QatkitError, match="valid runtimes: onnxruntime, openvino, rknn"):
        qatkit.verify(small.net, small.path, small.data, runtime="tensorrt")
    with pytest.raises(QatkitError, match="valid: f32, bf16, f16"):
        open_runtime(small.path, "openvino", precision="int4")
    with pytest.raises(QatkitError, match="valid: f32$"):
        open_runtime(small.path, "onnxruntime", precision="bf16")


def test_missing_openvino_names_the_extra(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(QatkitError, match=r"pip install 'qatkit\[openvino\]'"):
        open_runtime(small.path, "openvino")


# ---------------------------------------------------------------- verify on OpenVINO
def test_small_net_agrees_on_openvino(small):
    report = qatkit.verify(small.net, small.path, small.data, runtime="openvino")
    assert (report.runtime, report.precision, report.batches) == ("openvino", "f32", 2)
    assert report.values > 2 * 6 * 16 * 16 * 6  # every quantized tensor, not only the outputs
    assert report.within_one_step >= 0.999, report.worst_layers
    assert report.outputs_within_one_step >= 0.999 and report.max_steps <= 2, report
    assert report.tapped_outputs_identical  # exposing the Q outputs does not change OpenVINO's model outputs


def test_demo_detector_agrees_on_openvino(demo):
    """ORT on the export as is; OpenVINO on the unsigned export, which holds the same real values (ORT agrees)."""
    ort = qatkit.verify(demo.net, demo.path, demo.data)
    ov = qatkit.verify(demo.net, demo.unsigned_path, demo.data, runtime="openvino")
    assert ort.within_one_step >= 0.999, ort.worst_layers
    assert ov.within_one_step >= 0.999, (ov.worst_layers, ov.reasons)
    assert ov.outputs_within_one_step >= 0.999 and ov.tapped_outputs_identical
    ort_unsigned = qatkit.verify(demo.net, demo.unsigned_path, demo.data)
    assert ort_unsigned.within_one_step == ort.within_one_step and ort_unsigned.max_steps == ort.max_steps


def test_unsigned_export_is_the_same_model(demo):
    """Writing signed grids unsigned changes containers and zero points only: ORT's outputs are bit-identical."""
    feed = demo.data[0].numpy()
    signed, unsigned = (open_runtime(p, "onnxruntime").run({"images": feed}) for p in (demo.path, demo.unsigned_path))
    assert all(np.array_equal(a, b) for a, b in zip(signed, unsigned))
    zero_points = zero_point_types(demo.unsigned_path)
    assert set(zero_points) == {"uint8"}, zero_points


def _cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


@pytest.mark.parametrize("demo", sorted(OPENVINO_SIGNED_DIVERGES), indirect=True)
def test_openvino_still_miscomputes_the_signed_export(demo):
    """The OpenVINO defect behind unsigned_activations, and that verify names the fix where it shows. It depends on
    the CPU's kernels: seen on AMD EPYC (avx512_vnni, no AMX), not on an Intel Xeon with AMX (docs/openvino.md), where
    the test reports that OpenVINO agrees instead of failing; where it fails, OpenVINO fixed it: update the docs."""
    ov = qatkit.verify(demo.net, demo.path, demo.data, runtime="openvino")
    if ov.within_one_step >= 0.999 and "amx_int8" in _cpu_flags():
        pytest.skip(f"OpenVINO computes the signed export right on this CPU with AMX (layer-wise "
                    f"{ov.within_one_step:.5f}): the defect is in a kernel path it does not take")
    assert ov.within_one_step < 0.999 and ov.worst_layers and set(ov.reasons) == {k for k, _ in ov.worst_layers}
    assert all("unsigned_activations=True" in why for why in ov.reasons.values()), ov.reasons  # names the fix


def test_metric_is_computed_on_pytorch_and_on_the_runtime(demo, shapes):
    """The demo's COCO mAP as a metric callable: evaluated once on each predictor, both close."""
    from qatkit.apps.eval.detect import evaluate

    _, val = shapes
    seen = []

    def metric(predict) -> float:
        seen.append(predict)
        return evaluate(predict, val)["map"]

    runtimes = CPU_RUNTIMES
    for runtime in runtimes:
        path = demo.unsigned_path if runtime == "openvino" else demo.path
        report = qatkit.verify(demo.net, path, demo.data, runtime=runtime, metric=metric)
        assert report.torch_map > 0.5, report.torch_map  # the trained detector finds the shapes
        assert abs(report.onnx_map - report.torch_map) <= 0.02, (runtime, report.onnx_map, report.torch_map)
    assert len(seen) == 2 * len(runtimes) and len({id(p) for p in seen}) == len(seen)


def test_verify_takes_a_metric_not_a_dataset():
    # verify(dataset=...) (which imported the demo's evaluator from the core) is gone: pass
    # metric=lambda predict: evaluate(predict, dataset)["map"] (qatkit.apps.eval.detect.evaluate), as above.
    import inspect

    assert "dataset" not in inspect.signature(qatkit.verify).parameters
    assert "metric" in inspect.signature(qatkit.verify).parameters


@pytest.mark.parametrize("demo", ["tensorrt"], indirect=True)  # the recipe with disagreeing layers to blame
def test_bf16_precision_is_reported_and_blamed(demo):
    """Asked for bf16, OpenVINO's float parts lose mantissa bits; where a layer disagrees, the reason says so."""
    report = qatkit.verify(demo.net, demo.path, demo.data, runtime="openvino", precision="bf16")
    assert report.precision == "bf16"
    assert all("bf16" in why for why in report.reasons.values())
    if not report.reasons:  # no layer beyond one step on this CPU (seen on an Intel Xeon with AMX): bf16 still ran,
        f32 = qatkit.verify(demo.net, demo.path, demo.data, runtime="openvino")  # as the free-running outputs show
        assert report.free_running_within_one_step < f32.free_running_within_one_step, (report, f32)
    else:
        assert report.worst_layers
