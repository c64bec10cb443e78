"""Benchmarks (not tests): `make bench`. Writes docs/benchmarks.md with the figures and the command.

1. qatkit's demo pipeline (PTQ -> QAT -> export) on the shipped float checkpoint, recipe onnxruntime.
2. ONNX Runtime's own `quantize_static` (QDQ, U8S8, per-channel weights; MinMax and Entropy calibration) on the
   same fp32 ONNX model and the same calibration images.
Both int8 models are scored with the same COCO mAP evaluation and timed with the same ORT latency helper.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

from qatkit import onnx_runtime
from qatkit.demo import run_demo
from qatkit.eval.detect import evaluate
from qatkit.runconfig import RunConfig
from qatkit.stages import datasets, image_batches

ROOT = Path(__file__).resolve().parents[1]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._it = iter([{"images": b.numpy()} for b in batches])

    def get_next(self):
        return next(self._it, None)


def ort_quantize_static(cfg: RunConfig, fp32: Path, method: CalibrationMethod, out: Path) -> Path:
    train, _ = datasets(cfg)
    batches = [b[i:i + 1] for b in image_batches(train, cfg.calib_batches, cfg.batch_size, cfg.seed)
               for i in range(len(b))]  # batch 1: the ORT calibrator concatenates outputs per input
    quantize_static(str(fp32), str(out), _Reader(batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=True, calibrate_method=method)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    cfg = RunConfig(out=Path(args.out), quiet=True)
    start = time.time()
    summary = run_demo(cfg, log=lambda *a: None)
    _, val = datasets(cfg)
    fp32 = Path(args.out) / "model.fp32.onnx"
    shape = (1, 3, cfg.img_size, cfg.img_size)
    rows = [("qatkit PTQ+QAT (onnxruntime recipe)", summary["onnx_int8_map"], summary["int8_ms"])]
    for label, method in (("ORT quantize_static MinMax", CalibrationMethod.MinMax),
                          ("ORT quantize_static Entropy", CalibrationMethod.Entropy)):
        try:
            path = ort_quantize_static(cfg, fp32, method, Path(args.out) / f"ort_{method.name.lower()}.onnx")
            m = evaluate(onnx_runtime.predictor(onnx_runtime.session(path)), val)["map"]
            rows.append((label, m, onnx_runtime.latency_ms(path, shape, runs=cfg.latency_runs)))
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, not dropped
            rows.append((f"{label} (failed: {type(e).__name__}: {e})", float("nan"), float("nan")))
    fp32_ms = summary["fp32_ms"]
    lines = [
        "# Benchmarks", "",
        f"Command: `make bench` (= `python benchmarks/run.py`), {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {sys.version.split()[0]}.",
        "", "Demo detector (shipped float checkpoint), 500 held-out generated images, COCO mAP@0.5:0.95; "
        "latency = ORT CPU median of one batch-1 run.", "",
        f"float (PyTorch) mAP {summary['float_map']:.4f}; fp32 ONNX mAP {summary['onnx_fp32_map']:.4f}, "
        f"{fp32_ms:.2f} ms.", "",
        "| int8 model | ORT int8 mAP | int8 ms | fp32_ms / int8_ms |", "|---|---|---|---|",
    ]
    lines += [f"| {name} | {m:.4f} | {ms:.2f} | {fp32_ms / ms:.2f}x |" for name, m, ms in rows]
    brief = {k: summary[k] for k in ("ptq_map", "qat_map", "within_one_step")}
    lines += ["", f"qatkit demo summary: `{json.dumps(brief)}`",
              "", f"Total benchmark time {time.time() - start:.0f} s."]
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
