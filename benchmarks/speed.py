"""ONNX Runtime int8 vs fp32 speed of qatkit's `onnxruntime` recipe on detectors (a benchmark, not a test).

`make bench` runs it; it writes docs/speed.md with the figures and the command. For each model: quantize with the
`onnxruntime` recipe, calibrate, export int8 and fp32 ONNX, then time both in ORT (batch 1), alternating fp32/int8
rounds so that a noisy machine affects both alike; the ratio is of the medians. Also lists the op types ORT runs
after its QDQ fusions, to show what stayed float.

* demo: the shipped float checkpoint (160x160), calibrated on 8 batches of the generated training set.
* yolov8n: ultralytics YOLOv8n built from its yaml (random weights: nothing is downloaded; BatchNorm statistics set
  from random images, so activations have a realistic spread), 640x640, calibrated on 8 random images. Speed does
  not depend on the weights' values; accuracy is not measured here.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import onnxruntime
import torch
from torch import nn

import qatkit
from qatkit.targets import ort
from qatkit.apps.runconfig import RunConfig
from qatkit.apps.stages import datasets, image_batches, load_float

ROOT = Path(__file__).resolve().parents[1]


def demo() -> tuple[nn.Module, list[torch.Tensor], int]:
    cfg = RunConfig(quiet=True)
    train, _ = datasets(cfg)
    return load_float(cfg.float_checkpoint), list(image_batches(train, 8, 8, 0)), cfg.img_size


def with_bn_statistics(model: nn.Module, size: int) -> nn.Module:
    """Random weights with BatchNorm statistics from random images (so activations have a realistic spread)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(2, 3, size, size))
    return model.eval()


def yolov8n(size: int = 640) -> tuple[nn.Module, list[torch.Tensor], int]:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = with_bn_statistics(DetectionModel("yolov8n.yaml", verbose=False), size)
    return model, [torch.rand(1, 3, size, size) for _ in range(8)], size


def measure(name: str, build, out: Path, rounds: int, runs: int) -> dict:
    model, batches, size = build()
    x = batches[0][:1]
    fp32 = qatkit.export_onnx(model, (x,), out / f"{name}.fp32.onnx")
    qatkit.quantize(model, "onnxruntime", (x,))
    qatkit.calibrate(model, batches, method="mse")
    int8 = qatkit.export_onnx(model, (x,), out / f"{name}.int8.onnx")
    shape = (1, 3, size, size)
    times = {"fp32": [], "int8": []}
    for _ in range(rounds):
        for kind, path in (("fp32", fp32), ("int8", int8)):
            times[kind].append(ort.latency_ms(path, shape, runs=runs))
    fp32_ms, int8_ms = statistics.median(times["fp32"]), statistics.median(times["int8"])
    ops = ort.fused_op_counts(int8)
    float_ops = {k: v for k, v in ops.items() if not k.startswith(("QLinear", "Quantize", "Dequantize"))}
    return {"model": name, "size": size, "fp32_ms": fp32_ms, "int8_ms": int8_ms, "ratio": fp32_ms / int8_ms,
            "qlinear": sum(v for k, v in ops.items() if k.startswith("QLinear")), "float_ops": float_ops}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/speed")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "speed.md"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows = [measure(n, b, out, args.rounds, args.runs) for n, b in (("demo", demo), ("yolov8n", yolov8n))]
    lines = [
        "# ONNX Runtime int8 vs fp32 speed (onnxruntime recipe)", "",
        f"Command: `python benchmarks/speed.py` (part of `make bench`), {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}.", "",
        f"Batch 1, median over {args.rounds} alternating rounds of {args.runs} runs each.", "",
        "| model | input | fp32 ms | int8 ms | fp32/int8 | QLinear ops | ops ORT runs in float |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        float_ops = ", ".join(f"{k} {v}" for k, v in sorted(r["float_ops"].items()))
        lines.append(f"| {r['model']} | {r['size']}x{r['size']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | "
                     f"{r['ratio']:.2f}x | {r['qlinear']} | {float_ops} |")
    lines += ["", f"Total time {time.time() - start:.0f} s."]
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
