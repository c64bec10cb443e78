"""Fake-quant kernel time, forward and backward: PyTorch's CPU ops vs qatkit's compiled kernels (a benchmark).

`make bench` runs it; it prints a table and writes it into docs/performance.md with this command. Shapes: a
16x32x80x80 activation (per tensor, uint8 grid) and a 512x512x3x3 weight (per output channel, 7-bit grid), the
compiled per-channel weight path (range, qparams and fake-quant in one kernel), and the fused quantized SiLU against
its three separate ops. Median of ``--runs`` calls after a warm-up (which compiles the kernels once).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from doc_block import write_block
from qatkit.quant.kernels import _fake_quantize_cpu, fused_weight_fake_quant
from qatkit.quant.silu_kernel import quantized_silu

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- kernels:begin -->", "<!-- kernels:end -->"


def timed(fn: Callable[[], torch.Tensor], x: torch.Tensor, runs: int) -> float:
    """Median ms of forward + backward of ``fn`` (which reads ``x``)."""
    times = []
    for i in range(runs + 2):
        x.grad = None
        t0 = time.perf_counter()
        y = fn()
        y.backward(torch.ones_like(y))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def rows(runs: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(0)
    act = torch.randn(16, 32, 80, 80, generator=g).requires_grad_()
    s, z = torch.tensor(0.02), torch.tensor(3, dtype=torch.int32)
    w = torch.randn(512, 512, 3, 3, generator=g).requires_grad_()
    sw, zw = w.detach().abs().amax(dim=(1, 2, 3)) / 63, torch.zeros(512, dtype=torch.int32)
    sig_s, sig_z = torch.tensor(1 / 255), torch.tensor(0, dtype=torch.int32)

    def weight_separate() -> torch.Tensor:
        lo, hi = w.detach().amin(dim=(1, 2, 3)), w.detach().amax(dim=(1, 2, 3))
        scale = torch.maximum(lo.abs(), hi) / 63
        return torch.fake_quantize_per_channel_affine(w, scale, zw, 0, -64, 63)

    return [
        ("activation 16x32x80x80, per tensor",
         timed(lambda: torch.fake_quantize_per_tensor_affine(act, s, z, 0, 255), act, runs),
         timed(lambda: _fake_quantize_cpu(act, s, z, None, 0, 255), act, runs)),
        ("weight 512x512x3x3, per channel",
         timed(lambda: torch.fake_quantize_per_channel_affine(w, sw, zw, 0, -64, 63), w, runs),
         timed(lambda: _fake_quantize_cpu(w, sw, zw, 0, -64, 63), w, runs)),
        ("weight 512x512x3x3: range + qparams + fake-quant",
         timed(weight_separate, w, runs), timed(lambda: fused_weight_fake_quant(w, -64, 63, True)[0], w, runs)),
        ("SiLU 16x32x80x80 as x * fq(sigmoid(x))",
         timed(lambda: act * torch.fake_quantize_per_tensor_affine(torch.sigmoid(act), sig_s, sig_z, 0, 255), act,
               runs),
         timed(lambda: quantized_silu(act, sig_s, sig_z, 0, 255), act, runs)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"),
                    help="the page whose block gets the table ('' to print only)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = ["| tensor | PyTorch ops, ms | qatkit compiled, ms | speed-up |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.2f} | {b:.2f} | {a / b:.1f}x |" for name, a, b in rows(args.runs)]
    print("\n".join(lines))
    command = "python " + " ".join(["benchmarks/fake_quant_kernels.py", *sys.argv[1:]])
    if args.doc:
        header = (f"Command: `{command}`; {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
                  f"forward + backward, median of {args.runs}.")
        write_block(Path(args.doc), BEGIN, END, [header, "", *lines],
                    "## Fake-quant kernels (`benchmarks/fake_quant_kernels.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
