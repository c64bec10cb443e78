"""The GPU regime measured on any machine: ATen ops dispatched per QAT training step, qatkit beside ModelOpt and the
float model (a benchmark; issue #21).

On a GPU each dispatched ATen op is a kernel launch and the kernels are fast, so a step costs its op count and the
Python around the ops (hooks, the torch-function mode). This script runs with ``QATKIT_FUSED_FAKE_QUANT=0`` (set
before qatkit is imported), so qatkit dispatches what it dispatches on a GPU: PyTorch's own fake-quant ops, none of
the CPU's C kernels. One step = forward, the mean-square loss of step_time.py, backward, SGD step (momentum:
AdamW's per-parameter ops would dilute the ratios); quantized
models calibrated (max) on 2 batches, BatchNorm frozen for qatkit (its QAT default), ModelOpt as it trains.

* **ATen ops**: counted by a ``TorchDispatchMode`` over one step (after two warm-up steps); the counts are
  deterministic, so one run gives them.
* **Host time outside the ops is not reported.** Measured as the plain step's wall time minus the time inside the
  ops of a counted step (each op timed alone), it came out negative on this CPU (-190 ms of a 0.3 s step for the
  tensorrt recipe): ops run slower under a Python dispatch mode than without one, so the two runs do not measure
  the same ops. It needs a GPU's profiler trace (CUDA kernel time against wall time), which
  ``scripts/gpu_check.sh`` can collect where there is a GPU.

`make bench` runs it and writes the table into docs/performance.md with this command and the machine;
``--doc ''`` only prints it.
"""
from __future__ import annotations

import os

os.environ["QATKIT_FUSED_FAKE_QUANT"] = "0"  # before qatkit is imported: what a GPU runs

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from doc_block import write_block  # noqa: E402
from qatkit.analysis.dispatch_count import OpCounter  # noqa: E402
from step_time import VARIANTS, loss_of, machine, resnet18, yolov8n  # noqa: E402

CASES = {"resnet18 b2 32px": (resnet18, 2, 32), "yolov8n b4 256px": (yolov8n, 4, 256)}
NAMES = ["float", "qatkit tensorrt, BN frozen", "qatkit onnxruntime, BN frozen", "ModelOpt INT8_DEFAULT_CFG"]
BEGIN, END = "<!-- dispatch_cost:begin -->", "<!-- dispatch_cost:end -->"
HEADING = "## ATen ops per QAT step, the GPU regime (`benchmarks/dispatch_cost.py`)"


class Step:
    """One model's training step on fixed inputs."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model.train(), x
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)

    def __call__(self) -> None:
        loss = loss_of(self.model(self.x))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def counted(self) -> OpCounter:
        """One step under an :class:`OpCounter`."""
        with OpCounter() as counter:
            self()
        return counter


def measure(case: str) -> dict[str, int | str]:
    """ATen ops of one training step of each variant on ``case``."""
    build_float, batch, size = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    calib = [torch.rand(batch, 3, size, size, generator=g) for _ in range(2)]
    float_model = build_float()
    out: dict[str, int | str] = {}
    for name in NAMES:
        build, _ = VARIANTS[name]
        try:
            step = Step(build(float_model, calib) if build else copy.deepcopy(float_model), x)
            step()
            step()  # warm-up: allocators, lazily built state
            out[name] = sum(step.counted().ops.values())
        except Exception as e:  # noqa: BLE001 - a tool that cannot handle the model gets a cell saying why
            out[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        print(f"{case}: {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| variant | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for name in NAMES:
        cells = []
        for r in results.values():
            value, base = r.get(name, "not run"), r.get("float")
            cells.append(f"{value} ({value / base:.2f}x)" if isinstance(value, int) and isinstance(base, int)
                         else str(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"), help="page to write ('' = print)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {case: measure(case) for case in args.cases.split(",")}
    lines = table(results)
    print("\n".join(lines))
    if args.doc:
        command = "python benchmarks/dispatch_cost.py " + " ".join(sys.argv[1:])
        write_block(Path(args.doc), BEGIN, END, [
            f"Command: `{command.strip()}`. {machine('cpu')} QATKIT_FUSED_FAKE_QUANT=0 (what a GPU dispatches). "
            "ATen ops per training step (forward, loss, backward, SGD step), in brackets the ratio to the float "
            "model's.", "",
            *lines], HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
