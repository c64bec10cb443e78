"""qatkit.integrations.ultralytics: QAT inside ultralytics' own DetectionTrainer (docs/ultralytics_integration.md).

Everything runs for real on a tiny YOLO-format shapes set (64 px): a float ``best.pt`` from a one-epoch
``YOLO("yolov8n.yaml").train``, then qatkit's ``train`` on it; resume after an interruption; DDP with gloo under
torchrun; the EMA handling on a quantized DetectionModel.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("ultralytics")
os.environ.setdefault("YOLO_OFFLINE", "1")

from ultralytics import YOLO  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model  # noqa: E402

import qatkit  # noqa: E402
from qatkit.apps.data import YoloDetection, generate_shapes  # noqa: E402
from qatkit.apps.model_source import parse_model  # noqa: E402
from qatkit.apps.stages import load_quantized  # noqa: E402
from qatkit.errors import CheckpointError, QatkitError, RecipeError  # noqa: E402
from qatkit.integrations.ultralytics import QatModelEMA, QatSettings, load_model, train  # noqa: E402
from qatkit.quant.qparams import range_to_qparams  # noqa: E402

SIZE = 64
RUN = dict(imgsz=SIZE, batch=8, workers=0, plots=False, device="cpu", exist_ok=True, verbose=False)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shapes(tiny_yolo_data) -> Path:
    """The shapes set in YOLO format (32 train, 16 val images), shared with the other ultralytics tests."""
    return Path(tiny_yolo_data).parent


@pytest.fixture(scope="module")
def data(tiny_yolo_data) -> str:
    return tiny_yolo_data


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def float_pt(tiny_yolo_pt) -> Path:
    """A user's ``best.pt``: one epoch of plain ultralytics training (tests/conftest.py)."""
    return tiny_yolo_pt


@pytest.fixture(scope="module")
def qat_run(data, float_pt, runs):
    """One QAT epoch of the user's YOLO object; records what the EMA looked like once the trainer set it up."""
    seen: dict = {"ema_eval_calls": 0, "calibrations": 0}

    def on_setup(trainer) -> None:
        live, ema = unwrap_model(trainer.model), trainer.ema.ema
        seen["ema_type"] = type(trainer.ema).__name__
        seen["separate_state"] = ema._qatkit is not live._qatkit
        seen["hooks_on_ema"] = all(h.root is ema and h.state is ema._qatkit for h in ema._qatkit._model_hooks)
        seen["wrapper"] = type(trainer.model).__name__
        state = ema._qatkit
        first = state.q(state.sites[""].inputs[0])  # the model-input quantizer

        def count(module, args, output) -> None:
            if not module.training and bool(module.fake_quant_enabled):
                seen["ema_eval_calls"] += 1

        first.register_forward_hook(count)
        live_state = live._qatkit
        live_first = live_state.q(live_state.sites[""].inputs[0])
        seen["train_inputs"] = []

        def shape(module, args) -> None:
            if module.training:
                seen["train_inputs"].append(tuple(args[0].shape))

        live_first.register_forward_pre_hook(shape)

    def on_calibrated(trainer) -> None:
        seen["calibrations"] += 1

    result = train(YOLO(str(float_pt)), data=data, recipe="onnxruntime", epochs=1, calib_batches=2,
                   project=str(runs), name="qat",
                   callbacks={"on_pretrain_routine_end": on_setup, "on_qat_calibrate_end": on_calibrated}, **RUN)
    return result, seen


def _images(shapes: Path, n: int = 4) -> torch.Tensor:
    val = YoloDetection(shapes / "data.yaml", "val", SIZE)
    return torch.stack([val.image(i) for i in range(n)])


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x)
    return [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------------- the QAT run
def test_the_run_trains_the_quantized_model_in_ultralytics_loop(qat_run):
    result, seen = qat_run
    assert seen["calibrations"] == 1
    assert seen["wrapper"] == "ImageThenLoss"  # the training forward takes the image tensor, not the batch dict
    # so the model-input quantizer quantizes the images (on the dict it would take batch_idx, a 1-D tensor)
    assert seen["train_inputs"] and all(len(s) == 4 and s[1:] == (3, SIZE, SIZE) for s in seen["train_inputs"])
    assert result.last is not None and result.best is not None and result.save_dir == result.last.parents[1]
    assert set(result.metrics) >= {"metrics/mAP50-95(B)", "val/box_loss"}
    assert qatkit.uncalibrated(result.model) == [] and not result.model.training
    assert result.calibration_seconds > 0 and len(result.epoch_seconds) == 1 and result.mean_epoch_seconds > 0


def test_the_ema_copy_has_its_own_quantizers_and_validates_quantized(qat_run):
    _, seen = qat_run
    assert seen["ema_type"] == "QatModelEMA"
    assert seen["separate_state"] and seen["hooks_on_ema"]
    assert seen["ema_eval_calls"] > 0  # validation ran the EMA, fake-quant on, through its own input quantizer


def test_checkpoints_are_weights_only_qatkit_files_with_training_state(qat_run):
    result, _ = qat_run
    for path in (result.last, result.best):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["format"] == "qatkit-quantized-1" and ckpt["recipe"]["name"] == "onnxruntime"
        assert any(k.startswith("_qatkit.quantizers.") for k in ckpt["state_dict"])
        meta = ckpt["metadata"]
        assert meta["stage"] == "ultralytics-qat" and meta["names"] == {0: "circle", 1: "square", 2: "triangle"}
        assert meta["model"]["kind"] == "ultralytics-pt" and meta["model"]["yaml"]["nc"] == 3
        state = meta["ultralytics"]
        assert state["epoch"] == 0 and state["ema_updates"] > 0 and state["train_args"]["imgsz"] == SIZE
        assert state["calibration"]["transforms"] == "val" and state["calibration"]["batches"] == 2
        assert state["optimizer"] is None  # best.pt never holds it; last.pt loses it when the run ends


def test_reloading_a_checkpoint_gives_identical_outputs(qat_run, shapes):
    result, _ = qat_run
    x = _images(shapes)
    expected = _outputs(result.model, x)
    for reloaded in (load_model(result.best), load_quantized(result.best)):
        got = _outputs(reloaded, x)
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert load_model(result.best).names == {0: "circle", 1: "square", 2: "triangle"}


def test_the_trained_model_exports_and_verifies_layer_by_layer(qat_run, shapes, tmp_path):
    result, _ = qat_run
    x = _images(shapes, 8)
    path = qatkit.export_onnx(result.model, (x[:1],), tmp_path / "qat.qdq.onnx")
    report = qatkit.verify(result.model, path, [x[:4], x[4:]])
    assert report.within_one_step >= 0.999, report.worst_layers


# ---------------------------------------------------------------------------------------------------- resume
class _Interrupt(Exception):
    """Stands for a killed run."""


@pytest.fixture(scope="module")
def interrupted(data, float_pt, runs) -> Path:
    """A 2-epoch run stopped when its second epoch starts: last.pt holds epoch 0."""
    def stop(trainer) -> None:
        if trainer.epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(YOLO(str(float_pt)), data=data, epochs=2, calib_batches=2, project=str(runs), name="resume",
              callbacks={"on_train_epoch_start": stop}, **RUN)
    return runs / "resume" / "weights" / "last.pt"


def test_resume_continues_from_the_saved_epoch_with_the_saved_quantizers(interrupted, data):
    saved = torch.load(interrupted, map_location="cpu", weights_only=True)
    assert saved["metadata"]["ultralytics"]["epoch"] == 0 and saved["metadata"]["ultralytics"]["optimizer"]
    seen: dict = {"calibrations": 0}

    def on_setup(trainer) -> None:
        seen["start_epoch"] = trainer.start_epoch
        seen["live"] = {k: v.clone() for k, v in unwrap_model(trainer.model)._qatkit.state_dict().items()}
        seen["ema"] = {k: v.clone() for k, v in trainer.ema.ema._qatkit.state_dict().items()}
        seen["ema_updates"] = trainer.ema.updates

    def on_calibrated(trainer) -> None:
        seen["calibrations"] += 1

    result = train(resume=interrupted, data=data,
                   callbacks={"on_pretrain_routine_end": on_setup, "on_qat_calibrate_end": on_calibrated})
    assert seen["start_epoch"] == 1 and seen["calibrations"] == 0 and result.calibration_seconds is None
    quantizers = {k[len("_qatkit."):]: v for k, v in saved["state_dict"].items() if k.startswith("_qatkit.")}
    for state in (seen["live"], seen["ema"]):
        assert state.keys() == quantizers.keys()
        assert all(torch.equal(state[k], quantizers[k]) for k in quantizers)
    assert seen["ema_updates"] == saved["metadata"]["ultralytics"]["ema_updates"]
    assert len(result.epoch_seconds) == 1  # one epoch ran: the second
    with open(result.save_dir / "results.csv") as f:
        assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [1, 2]
    final = torch.load(result.last, map_location="cpu", weights_only=True)["metadata"]["ultralytics"]
    assert final["epoch"] == 1 and final["calibration"]["batches"] == 2  # the original calibration record


# ---------------------------------------------------------------------------------------------------- errors
def test_a_nan_loss_after_the_first_epoch_says_to_resume(data, float_pt, runs):
    def poison(trainer) -> None:  # what a diverging loss leaves for ultralytics' NaN check
        if trainer.epoch == 1:
            trainer.loss = torch.tensor(float("nan"))

    with pytest.raises(QatkitError, match=r"NaN/Inf at epoch 2.*resume from it"):
        train(YOLO(str(float_pt)), data=data, epochs=2, calib_batches=1, project=str(runs), name="nan",
              callbacks={"on_train_epoch_end": poison}, **RUN)


def test_resume_rejects_what_is_not_a_resumable_qat_checkpoint(qat_run, float_pt, tmp_path):
    result, _ = qat_run
    with pytest.raises(CheckpointError, match=r"train\(YOLO\(path\)"):
        train(resume=float_pt)  # an ultralytics checkpoint: pickled, starts a new run instead
    plain = qatkit.save(result.model, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="without ultralytics training state"):
        train(resume=plain)
    with pytest.raises(CheckpointError, match="no optimizer state.*weights/last.pt"):
        train(resume=result.best)


def test_bad_models_and_arguments_name_the_fix(qat_run, float_pt, data):
    result, _ = qat_run
    with pytest.raises(QatkitError, match="not an ultralytics DetectionModel"):
        train(torch.nn.Conv2d(3, 8, 3), data=data)
    with pytest.raises(QatkitError, match="already quantized by qatkit.*resume="):
        train(result.model, data=data)
    with pytest.raises(QatkitError, match="not an ultralytics model"):
        train("demo", data=data)
    with pytest.raises(QatkitError, match="quantize=8 is ultralytics' own QAT"):
        train(YOLO(str(float_pt)), data=data, quantize=8)
    with pytest.raises(RecipeError, match="calib_batches must be an int >= 1"):
        QatSettings(calib_batches=0)
    with pytest.raises(RecipeError, match="unknown calib_method"):
        QatSettings(calib_method="median")


# ---------------------------------------------------------------------------------------------------- EMA
@pytest.fixture(scope="module")
def asym_model():
    """yolov8n (3 classes) quantized with the recipe whose activation ranges move during QAT (uint8, EMA ranges)."""
    torch.manual_seed(0)
    model = parse_model("yolov8n.yaml").build()
    qatkit.quantize(model, "npu-uint8", (torch.zeros(1, 3, SIZE, SIZE),))
    qatkit.calibrate(model, [torch.rand(2, 3, SIZE, SIZE) for _ in range(2)])
    return model


def test_the_ema_copy_hooks_act_on_its_own_quantizers(asym_model):
    ema = QatModelEMA(asym_model).ema
    x = torch.rand(2, 3, SIZE, SIZE)
    live_before, ema_before = _outputs(asym_model, x)[0], _outputs(ema, x)[0]
    assert torch.equal(live_before, ema_before)
    static = [q for q in ema._qatkit.quantizers.values() if not q.dynamic]
    saved = [q.scale.clone() for q in static]
    for q in static:
        q.scale.mul_(3.0)
    try:
        assert not torch.equal(_outputs(ema, x)[0], ema_before)  # the EMA's hooks read the EMA's quantizers
        assert torch.equal(_outputs(asym_model, x)[0], live_before)  # and never the live model's
    finally:
        for q, s in zip(static, saved):
            q.scale.copy_(s)


def _inconsistent(model) -> list[str]:
    """Static EMA-range quantizers whose scale/zero point are not those of their range."""
    bad = []
    for q in model._qatkit.quantizers.values():
        if q.dynamic or q.scheme.scale_mode != "ema":
            continue
        scale, zp = range_to_qparams(q.range_lo, q.range_hi, q.scheme.qmin, q.scheme.qmax, q.scheme.symmetric)
        if not (torch.equal(zp.reshape(q.zero_point.shape).int(), q.zero_point)
                and torch.allclose(scale.reshape(q.scale.shape).float(), q.scale, rtol=1e-6, atol=0)):
            bad.append(q.name)
    return bad


def _move_ranges(model, steps: int = 3) -> None:
    """Train-mode forwards on brighter, shifted inputs: the live model's EMA activation ranges move."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.rand(2, 3, SIZE, SIZE) * 3.0 - 1.0)


def test_ema_update_keeps_the_quantizer_state_consistent(asym_model):
    import copy

    live = copy.deepcopy(asym_model)
    qat_ema, plain_ema = QatModelEMA(live), ModelEMA(live)
    zero_points = {n: q.zero_point.clone() for n, q in qat_ema.ema._qatkit.quantizers.items()}
    _move_ranges(live)
    qatkit.freeze(live, bn=True, scales=False)
    qat_ema.update(live)
    plain_ema.update(live)
    # ultralytics averages scale and range but not the int32 zero point: the plain EMA pairs them wrongly
    assert _inconsistent(plain_ema.ema)
    assert _inconsistent(qat_ema.ema) == []
    assert any(not torch.equal(q.zero_point, zero_points[n]) for n, q in qat_ema.ema._qatkit.quantizers.items())
    assert bool(qat_ema.ema._qatkit.bn_frozen) and not bool(plain_ema.ema._qatkit.bn_frozen)
    qatkit.freeze(live, bn=True, scales=True)
    qat_ema.update(live)
    assert all(bool(q.scale_frozen) for q in qat_ema.ema._qatkit.quantizers.values() if not q.dynamic)
    assert all(torch.isfinite(t).all() for t in _outputs(qat_ema.ema, torch.rand(2, 3, SIZE, SIZE)))


# ---------------------------------------------------------------------------------------------------- DDP
def test_ddp_on_cpu_under_torchrun_gives_every_rank_the_same_quantizers(data, float_pt, tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ultra_ddp_worker.py"), data, str(float_pt), str(tmp_path / "runs"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and r["ddp"] == "DistributedDataParallel"
        assert r["sampler"] == "DistributedSampler" and r["shard"] == r["dataset"] // 2
        assert r["calibration_images"] == 2 * 8  # 2 steps of the global batch of 8, 4 images per rank
    # each rank calibrated on its own shard; the all-reduce in qatkit.calibrate made the scales equal (checked
    # before DDP's wrap broadcasts rank 0's buffers, so only the reduction can make them equal)
    assert ranks[0]["calibrated"] == ranks[1]["calibrated"]
    assert ranks[0]["final"] == ranks[1]["final"]
    last = Path(ranks[0]["last"])
    assert torch.load(last, map_location="cpu", weights_only=True)["metadata"]["ultralytics"]["epoch"] == 0
