"""ONNX Runtime int8 latency: qatkit's `onnxruntime` recipe vs ORT's own `quantize_static` (a benchmark).

`make bench` runs it and writes its table into docs/performance.md with this command. For resnet18 (224 px) and
YOLOv8n (320 px), both with random weights and BatchNorm statistics from random images (speed does not depend on
the weights' values): export the float model, quantize it with `quantize_static` (QDQ, uint8 activations, int8
per-channel 7-bit weights, i.e. `reduce_range`, as the recipe) and with qatkit (calibrated on the same 8 images),
then time fp32, quantize_static and qatkit in alternating rounds at 1 and 2 ORT threads, batch 1.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import qatkit
from doc_block import write_block
from onnx_latency import cpu_flags
from qatkit.targets.ort import fused_op_counts, latency_ms
from speed import with_bn_statistics, yolov8n

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- ort_latency:begin -->", "<!-- ort_latency:end -->"


def resnet18(size: int = 224) -> tuple[torch.nn.Module, list[torch.Tensor], int]:
    import torchvision

    torch.manual_seed(0)
    model = with_bn_statistics(torchvision.models.resnet18(), size)
    return model, [torch.rand(1, 3, size, size) for _ in range(8)], size


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.items = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self.items, None)


def export_all(model: torch.nn.Module, batches: list[torch.Tensor], folder: Path) -> dict[str, Path]:
    """fp32, quantize_static and qatkit ONNX files of ``model``."""
    x = batches[0]
    fp32 = qatkit.export_onnx(model, (x,), folder / "fp32.onnx")
    name = onnx.load(str(fp32)).graph.input[0].name
    quantize_static(str(fp32), str(folder / "qs.onnx"), _Reader(name, batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    qatkit.quantize(model, "onnxruntime", (x,))
    qatkit.calibrate(model, batches)
    return {"fp32": fp32, "quantize_static": folder / "qs.onnx",
            "qatkit": qatkit.export_onnx(model, (x,), folder / "qatkit.onnx")}


def measure(paths: dict[str, Path], size: int, threads: int, rounds: int, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            times[name].append(latency_ms(path, (1, 3, size, size), runs=runs, threads=threads))
    return {k: statistics.median(v) for k, v in times.items()}


def qdq_left(path: Path) -> int:
    ops = fused_op_counts(path)
    return ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"),
                    help="the page whose block gets the table ('' to print only)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    lines = ["| model | ORT threads | fp32 ms | quantize_static ms (speed-up) | qatkit ms (speed-up) | "
             "Q/DQ left after fusion: quantize_static / qatkit |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("resnet18 224 px", resnet18), ("yolov8n 320 px", lambda: yolov8n(320))):
            model, batches, size = build()
            folder = Path(tmp) / name.split()[0]
            folder.mkdir()
            paths = export_all(model, batches, folder)
            left = f"{qdq_left(paths['quantize_static'])} / {qdq_left(paths['qatkit'])}"
            for threads in (1, 2):
                ms = measure(paths, size, threads, args.rounds, args.runs)
                lines.append(f"| {name} | {threads} | {ms['fp32']:.2f} | {ms['quantize_static']:.2f} "
                             f"({ms['fp32'] / ms['quantize_static']:.2f}x) | {ms['qatkit']:.2f} "
                             f"({ms['fp32'] / ms['qatkit']:.2f}x) | {left} |")
                print(lines[-1], flush=True)
    command = "python " + " ".join(["benchmarks/ort_vs_quantize_static.py", *sys.argv[1:]])
    if args.doc:
        header = (f"Command: `{command}`. CPU flags: {cpu_flags()}; batch 1, median of {args.rounds} alternating "
                  f"rounds of {args.runs} runs.")
        write_block(Path(args.doc), BEGIN, END, [header, "", *lines],
                    "## ORT int8 latency vs quantize_static (`benchmarks/ort_vs_quantize_static.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
