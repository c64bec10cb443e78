"""ORT latency of several ONNX files of one model, timed in alternating rounds in one process (a benchmark, not a test).

Usage: python benchmarks/onnx_latency.py NAME=PATH [NAME=PATH ...] [--shape 1 3 160 160] [--rounds 5] [--runs 100]

Each round times every file (batch 1, `--runs` runs after 10 warm-up runs, median); the figure is the median over
rounds, so a noisy machine affects every file alike. Prints a Markdown table with the command, the CPU flags and
the versions, ratios against the first file.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import onnxruntime

from qatkit.targets.ort import fused_op_counts, latency_ms

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")


def cpu_flags() -> str:
    """The SIMD flags of this CPU that decide which ORT int8 kernels run."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = set(re.findall(r"\b(" + "|".join(FLAGS) + r")\b", text))
    return " ".join(f for f in FLAGS if f in found) or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=PATH of an ONNX file; the first is the reference")
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 3, 160, 160])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    for name, path in models.items():
        if not Path(path).is_file():
            ap.error(f"{name}: {path} does not exist (export it first)")
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, path in models.items():
            times[name].append(latency_ms(path, args.shape, runs=args.runs, threads=args.threads))
    median = {name: statistics.median(t) for name, t in times.items()}
    ref = next(iter(median.values()))
    print(f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"CPU flags: {cpu_flags()}; onnxruntime {onnxruntime.__version__}; batch {args.shape[0]}, "
          f"median of {args.rounds} alternating rounds of {args.runs} runs\n")
    print("| model | ms | vs first | QuantizeLinear/DequantizeLinear left after fusion |")
    print("|---|---|---|---|")
    for name, path in models.items():
        ops = fused_op_counts(path)
        left = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)
        print(f"| {name} | {median[name]:.2f} | {ref / median[name]:.2f}x | {left} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
