"""``qatkit demo``: from the shipped float checkpoint, PTQ -> QAT -> export -> verify -> ORT latency, one table.

Writes ``<out>/report.html`` (+ ``report.md``, see :mod:`qatkit.analysis.report`) and ``<out>/summary.json`` with float_map, ptq_map, qat_map, onnx_fp32_map, onnx_int8_map, within_one_step,
fp32_ms, int8_ms, recipe, openvino_int8_map, openvino_within_one_step (mAP = COCO mAP@0.5:0.95 on the held-out
split; ms = ORT median latency, batch 1; within_one_step = layer-wise, teacher-forced agreement with ONNX Runtime,
openvino_within_one_step the same with OpenVINO at f32, see :mod:`qatkit.verify`; the free-running figure is reported
beside it).
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch

from ..export import export_onnx
from ..targets import ort
from ..verify import verify
from .eval.detect import evaluate, torch_predictor
from .rknn_stage import check_target, rknn_stage
from .runconfig import RunConfig
from .stages import datasets, load_float, ptq, qat, save_quantized, val_batches


def _row(name: str, value, fmt: str = "{:.4f}") -> str:
    return f"| {name:<34} | {fmt.format(value) if value is not None else '-':>12} |"


def format_table(s: dict) -> str:
    f = s["float_map"]
    rows = [
        "| stage                              |        value |",
        "|------------------------------------|--------------|",
        _row("float mAP@0.5:0.95 (PyTorch)", f),
        _row(f"PTQ ({s['method']}) mAP (PyTorch fake-quant)", s["ptq_map"]),
        _row(f"QAT ({s['qat_steps']} steps) mAP (PyTorch)", s["qat_map"]),
        _row("fp32 ONNX mAP (ORT)", s["onnx_fp32_map"]),
        _row("int8 QDQ ONNX mAP (ORT)", s["onnx_int8_map"]),
        _row("PTQ / float", s["ptq_map"] / f),
        _row("QAT / float", s["qat_map"] / f),
        _row("int8 QDQ ONNX mAP (OpenVINO)", s["openvino_int8_map"]),
        _row("|ORT int8 - QAT| mAP", abs(s["onnx_int8_map"] - s["qat_map"])),
        _row("|OpenVINO int8 - QAT| mAP", abs(s["openvino_int8_map"] - s["qat_map"])),
        _row("layer-wise ORT = PyTorch +-1 step", s["within_one_step"], "{:.5f}"),
        _row("layer-wise OpenVINO = PyTorch +-1", s["openvino_within_one_step"], "{:.5f}"),
        _row("free-running outputs +-1 step", s["free_running_within_one_step"], "{:.5f}"),
        _row("ORT fp32 latency, batch 1 (ms)", s["fp32_ms"], "{:.2f}"),
        _row("ORT int8 latency, batch 1 (ms)", s["int8_ms"], "{:.2f}"),
        _row("int8 speed-up (fp32_ms / int8_ms)", s["fp32_ms"] / s["int8_ms"], "{:.2f}x"),
    ]
    return "\n".join(rows)


def _report(cfg: RunConfig, out: Path, summary: dict, qm, val):
    """The run's HTML/Markdown report: sensitivity by output SQNR (no labels needed) and activation histograms."""
    from ..analysis.report import activation_histograms, write_report
    from ..analysis.sensitivity import sensitivity, sqnr_metric

    batches = list(itertools.islice(val_batches(val, cfg.batch_size), 2))
    sens = sensitivity(qm, sqnr_metric(qm, batches[:1]), metric_name="output SQNR (dB)", quiet=cfg.quiet)
    return write_report(out, summary, qm, sensitivity=sens, histograms=activation_histograms(qm, batches))


def run_demo(cfg: RunConfig, log=print) -> dict:
    start = time.time()
    check_target(cfg.target, cfg.platform)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = datasets(cfg)
    shape = (1, 3, cfg.img_size, cfg.img_size)
    example = (torch.zeros(shape),)

    float_model = load_float(cfg.float_checkpoint)
    float_map = evaluate(torch_predictor(float_model), val, quiet=cfg.quiet, description="eval float")["map"]
    log(f"float mAP {float_map:.4f}")
    fp32_path = export_onnx(float_model, example, out / "model.fp32.onnx")
    fp32_map = evaluate(ort.predictor(ort.session(fp32_path)), val, quiet=cfg.quiet,
                        description="eval fp32 onnx")["map"]

    qm = ptq(cfg, float_model, train)
    save_quantized(qm, out / "ptq.pt", "ptq")
    ptq_map = evaluate(torch_predictor(qm), val, quiet=cfg.quiet, description="eval ptq")["map"]
    log(f"PTQ mAP {ptq_map:.4f}")

    qm = qat(cfg, qm, train)
    save_quantized(qm, out / "qat.pt", "qat")
    qat_path = export_onnx(qm, example, out / "model.qdq.onnx")
    def metric(predict) -> float:
        return evaluate(predict, val, quiet=cfg.quiet, description="eval int8")["map"]

    report = verify(qm, qat_path, val_batches(val, cfg.batch_size), metric=metric)
    log(f"QAT mAP {report.torch_map:.4f}, ORT int8 mAP {report.onnx_map:.4f}")
    ov = verify(qm, qat_path, val_batches(val, cfg.batch_size), runtime="openvino", metric=metric)
    log(f"OpenVINO int8 mAP {ov.onnx_map:.4f}, layer-wise within one step {ov.within_one_step:.5f}")

    fp32_ms = ort.latency_ms(fp32_path, shape, runs=cfg.latency_runs)
    int8_ms = ort.latency_ms(qat_path, shape, runs=cfg.latency_runs)
    summary = {
        "float_map": float_map, "ptq_map": ptq_map, "qat_map": report.torch_map,
        "onnx_fp32_map": fp32_map, "onnx_int8_map": report.onnx_map,
        "within_one_step": report.within_one_step, "max_steps": report.max_steps,
        "outputs_within_one_step": report.outputs_within_one_step,
        "free_running_within_one_step": report.free_running_within_one_step,
        "free_running_max_steps": report.free_running_max_steps,
        "fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms,
        "recipe": cfg.recipe, "method": cfg.method, "bias_correction": cfg.bias_correction, "qat_steps": cfg.qat_steps,
        "ort_ops": ort.fused_op_counts(qat_path),
        "openvino_int8_map": ov.onnx_map, "openvino_within_one_step": ov.within_one_step,
        "openvino_free_running_within_one_step": ov.free_running_within_one_step,
        "openvino_worst_layers": ov.worst_layers,
        "torch": torch.__version__, "seconds": round(time.time() - start, 1),
    }
    if cfg.target == "rknn":
        summary |= rknn_stage(qm, qat_path, val_batches(val, cfg.batch_size), metric, out, cfg.platform, log)
        summary["seconds"] = round(time.time() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.report:
        html_path, _ = _report(cfg, out, summary, qm, val)
        log(f"wrote {html_path}")
    log(format_table(summary))
    log(f"wrote {out / 'summary.json'} in {summary['seconds']:.0f} s")
    return summary
