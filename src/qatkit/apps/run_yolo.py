"""``qatkit run`` on an ultralytics detector: float eval -> calibrate (PTQ) -> QAT in ultralytics' trainer -> export
-> verify -> latency, one summary.

Every mAP is ultralytics' own (:func:`qatkit.apps.eval.yolo_map`: ``yolo val``'s letterbox, NMS and mAP@0.5:0.95 at
``rect=False``), for the float model, the PTQ model (the calibrated model QAT starts from, caught as the trainer
calibrates it), the QAT model (the EMA, as ultralytics validates it) and both ONNX files in ONNX Runtime. QAT runs
in :func:`qatkit.integrations.ultralytics.train`, so its loop, augmentation, loss, EMA and schedule are ultralytics'.

Writes into ``out``: ``summary.json`` (the demo's keys plus ``model`` and ``data``), ``report.html``/``report.md``,
``model.fp32.onnx``, ``model.qdq.onnx``, ``ptq.pt``, ``qat.pt`` and the trainer's run under ``qat/``; with
``target="rknn"`` also ``model.rknn`` and its simulator figures (``rknn_*`` keys).
"""
from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..calibrate import uncalibrated
from ..errors import QatkitError
from ..export import export_onnx
from ..quantize import freeze
from ..targets import ort
from ..verify import verify
from .eval.predictors import onnx_predictor, torch_predictor
from .eval.yolo_map import yolo_images, yolo_map
from .model_source import PT, YAML, ModelSource
from .rknn_stage import check_target, rknn_stage
from .stages import save_quantized


@dataclass
class YoloRunOptions:
    """What ``qatkit run`` does to an ultralytics model (CLI flags of the same names).

    Attributes:
        recipe: qatkit recipe name or YAML path.
        out: output folder.
        epochs: QAT epochs in ultralytics' trainer.
        fraction: fraction of the training set an epoch uses (ultralytics' ``fraction``).
        imgsz: square input size (None: the size the checkpoint was trained at, else 640).
        batch: training and evaluation batch size.
        calib_batches: calibration batches of ``batch`` training images (validation transforms).
        bias_correction: :func:`qatkit.correct_bias` after calibration (on up to 8 of those batches).
        lr0: QAT learning rate of :func:`finetune_overrides` (None: ultralytics' own schedule, meant for training
            from scratch; docs/ultralytics.md measures both on the shipped model).
        freeze_bn: BatchNorm uses its running statistics during QAT (:func:`qatkit.freeze`): each conv trains as it
            will be deployed, BN folded; right for fine-tuning a trained model (docs/ultralytics.md).
        resume: continue an interrupted QAT run in ``out/qat`` from its ``weights/last.pt``.
        latency_runs: ORT runs per latency figure (median, batch 1).
        quiet: no progress bars.
        target: ``"onnx"`` (the QDQ file, checked in ONNX Runtime) or ``"rknn"``: also compiled into
            ``model.rknn`` for ``platform`` and checked in rknn-toolkit2's simulator (:mod:`qatkit.apps.rknn_stage`).
        platform: the Rockchip chip for ``target="rknn"``.
    """

    recipe: str | dict = "onnxruntime"
    out: Path = Path("runs/run")
    epochs: int = 2
    fraction: float = 1.0
    imgsz: int | None = None
    batch: int = 16
    calib_batches: int = 16
    bias_correction: bool = False
    lr0: float | None = 1e-4
    freeze_bn: bool = True
    resume: bool = False
    latency_runs: int = 100
    quiet: bool = False
    target: str = "onnx"
    platform: str = "rk3588"


def trained_imgsz(model: nn.Module) -> int | None:
    """The image size an ultralytics checkpoint was trained at (``model.args["imgsz"]``), if it records one."""
    args = getattr(model, "args", None)
    imgsz = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    return int(imgsz) if isinstance(imgsz, int) else None


def finetune_overrides(lr0: float, batch: int) -> dict:
    """ultralytics train arguments that make QAT a fine-tune of a trained model (docs/ultralytics.md has the ablation).

    AdamW at ``lr0`` decaying linearly to 1 %; no warm-up (ultralytics' starts biases at lr 0.1); one optimizer step
    per batch (``nbs`` = batch; ultralytics' default nbs=64 accumulates 4 batches of 16, leaving a short fine-tune a
    quarter of the steps).

    Args:
        lr0: the learning rate.
        batch: the batch size.

    Example:
        >>> train(YOLO("best.pt"), data="data.yaml", epochs=2, batch=16, **finetune_overrides(1e-4, 16))
    """
    return {"optimizer": "AdamW", "lr0": lr0, "warmup_epochs": 0, "nbs": batch}


def _qat(float_model: nn.Module, data: Path, opts: YoloRunOptions, imgsz: int, ptq_holder: list):
    """QAT in ultralytics' trainer; ``ptq_holder`` receives a copy of the calibrated model before training."""
    from ..integrations.ultralytics import train

    def keep_ptq(trainer) -> None:
        ptq_holder.append(copy.deepcopy(trainer.model).eval())
        if opts.freeze_bn:  # before the EMA copies the model, so both carry the flag
            freeze(trainer.model, bn=True)

    last = opts.out / "qat" / "weights" / "last.pt"
    if opts.resume and not last.is_file():
        raise QatkitError(f"--resume: {last} does not exist (no interrupted QAT run in --out {opts.out}); run without "
                          "--resume to start one")
    overrides = {"imgsz": imgsz, "batch": opts.batch, "nbs": opts.batch, "fraction": opts.fraction,
                 "project": str(opts.out.resolve()), "name": "qat", "exist_ok": True, "device": "cpu", "workers": 0,
                 "plots": False}
    if opts.lr0 is not None:
        overrides |= finetune_overrides(opts.lr0, opts.batch)
    if opts.resume:
        return train(data=data, resume=last, epochs=opts.epochs, **overrides)
    return train(float_model, data=data, recipe=opts.recipe, epochs=opts.epochs, calib_batches=opts.calib_batches,
                 bias_correction=opts.bias_correction, callbacks={"on_qat_calibrate_end": keep_ptq}, **overrides)


def run_yolo(source: ModelSource, data: str | Path, opts: YoloRunOptions, log=print) -> dict:
    """The whole pipeline on an ultralytics model; returns (and writes) the summary.

    Args:
        source: an ultralytics ``.pt`` or model yaml (:func:`qatkit.apps.model_source.parse_model`).
        data: an ultralytics data.yaml.
        opts: the run's options.
        log: where progress lines go.

    Example:
        >>> run_yolo(parse_model("best.pt"), "data.yaml", YoloRunOptions(out=Path("runs/mine"), epochs=2))
    """
    if source.kind not in (PT, YAML):
        raise QatkitError(f"run_yolo takes an ultralytics model (.pt or model yaml), not {source.kind} {source.spec}")
    check_target(opts.target, opts.platform)
    start = time.time()
    out, data = Path(opts.out), Path(data)
    out.mkdir(parents=True, exist_ok=True)
    float_model = source.build(None).float().eval()
    imgsz = opts.imgsz or trained_imgsz(float_model) or 640
    shape = (1, 3, imgsz, imgsz)
    example = (torch.zeros(shape),)
    quiet = opts.quiet

    def map_of(predict) -> float:
        return yolo_map(predict, data, imgsz=imgsz, batch=opts.batch, progress=not quiet)["map50_95"]

    def score(predict, what: str) -> float:
        value = map_of(predict)
        log(f"{what} mAP@0.5:0.95 {value:.4f}")
        return value

    float_map = score(torch_predictor(float_model), "float (PyTorch)")
    fp32_path = export_onnx(float_model, example, out / "model.fp32.onnx")
    fp32_map = score(onnx_predictor(fp32_path), "float ONNX (ORT)")

    ptq_holder: list[nn.Module] = []
    result = _qat(float_model, data, opts, imgsz, ptq_holder)
    qm = result.model.eval()
    if uncalibrated(qm):
        raise QatkitError(f"QAT returned a model with uncalibrated quantizers {uncalibrated(qm)[:3]}")
    ptq_map = None
    if ptq_holder:  # a resumed run did not calibrate: no PTQ figure
        save_quantized(ptq_holder[0], out / "ptq.pt", "ptq", source)
        ptq_map = score(torch_predictor(ptq_holder[0]), "PTQ (PyTorch)")
    save_quantized(qm, out / "qat.pt", "qat", source)
    qdq_path = export_onnx(qm, example, out / "model.qdq.onnx")
    report = verify(qm, qdq_path, yolo_images(data, "val", imgsz=imgsz, batch=opts.batch),
                    metric=map_of)
    log(f"QAT (PyTorch) mAP@0.5:0.95 {report.torch_map:.4f}, int8 ONNX (ORT) {report.onnx_map:.4f}")
    fp32_ms = ort.latency_ms(fp32_path, shape, runs=opts.latency_runs)
    int8_ms = ort.latency_ms(qdq_path, shape, runs=opts.latency_runs)
    summary = {
        "model": source.spec, "data": str(data),
        "float_map": float_map, "ptq_map": ptq_map, "qat_map": report.torch_map,
        "onnx_fp32_map": fp32_map, "onnx_int8_map": report.onnx_map,
        "within_one_step": report.within_one_step, "max_steps": report.max_steps,
        "free_running_within_one_step": report.free_running_within_one_step,
        "fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms,
        "recipe": opts.recipe if isinstance(opts.recipe, str) else "custom",
        "bias_correction": opts.bias_correction, "imgsz": imgsz, "epochs": opts.epochs, "fraction": opts.fraction,
        "resumed": opts.resume,
        "calibration_seconds": result.calibration_seconds, "qat_epoch_seconds": result.epoch_seconds,
        "ort_ops": ort.fused_op_counts(qdq_path), "torch": torch.__version__,
        "seconds": round(time.time() - start, 1),
    }
    if opts.target == "rknn":
        summary |= rknn_stage(qm, qdq_path, yolo_images(data, "val", imgsz=imgsz, batch=opts.batch), map_of, out,
                              opts.platform, log)
        summary["seconds"] = round(time.time() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if ptq_map is not None:
        _report(out, summary, qm, data, imgsz, opts.batch, quiet)
    log(f"wrote {out / 'summary.json'} in {summary['seconds']:.0f} s")
    return summary


def _report(out: Path, summary: dict, qm: nn.Module, data: Path, imgsz: int, batch: int, quiet: bool) -> None:
    """report.html: accuracy/latency, sensitivity by output SQNR on one val batch, activation histograms."""
    from ..analysis.report import activation_histograms, write_report
    from ..analysis.sensitivity import sensitivity, sqnr_metric

    batches = list(itertools.islice(yolo_images(data, "val", imgsz=imgsz, batch=batch), 2))
    sens = sensitivity(qm, sqnr_metric(qm, batches[:1]), metric_name="output SQNR (dB)", quiet=quiet)
    write_report(out, summary, qm, sensitivity=sens, histograms=activation_histograms(qm, batches))
