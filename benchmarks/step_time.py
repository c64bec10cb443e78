"""QAT step time vs float step time, eager and under torch.compile, qatkit beside ModelOpt and torchao (a benchmark).

`make bench` runs it and writes the step-time table of docs/performance.md, with this command and the machine. One
step = forward, a loss (mean square of every float output, the same for every tool), backward, AdamW step, on fixed
random batches. Models: the demo detector (shipped float checkpoint, batch 16, 160 px), torchvision resnet18
(batch 8, 160 px; and batch 2, 32 px, where per-op cost dominates as on a GPU), ultralytics YOLOv8n from its yaml
(batch 8, 320 px). Every quantized model is calibrated (max) on 2 batches first. Rounds alternate all variants of a
model in one process, so machine noise hits them alike; a figure is the median step over all rounds, its ratio is
to the float step of the same run (compiled rows: to the compiled float step).

Variants: qatkit ``onnxruntime`` recipe with BatchNorm frozen (qatkit's QAT default, `qatkit.freeze`) and live
(train-mode BN, folding simulated); qatkit ``tensorrt`` recipe (conv/linear inputs and weights, ModelOpt's default
placement), BN live and frozen (ModelOpt trains BN unfused, in train mode); ModelOpt ``INT8_DEFAULT_CFG``; torchao
PT2E QAT (``prepare_qat_pt2e``, X86InductorQuantizer); and ``torch.compile`` of the float model and of qatkit's
``onnxruntime`` model (BN frozen).

``--device cuda`` runs the same steps on the GPU (model, batches and calibration data on it; each step's end time is
read after ``torch.cuda.synchronize()``) and writes its own block (GPU name instead of CPU flags) into the page;
``--doc ''`` only prints the table.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import qatkit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from doc_block import write_block  # noqa: E402 - the helpers live beside this script
from peers import ModelOpt, TorchaoPT2E  # noqa: E402

MARKERS = {  # device -> (begin, end, heading) of its block in the doc page
    "cpu": ("<!-- step_time:begin -->", "<!-- step_time:end -->", "## QAT step time (`benchmarks/step_time.py`)"),
    "cuda": ("<!-- step_time_cuda:begin -->", "<!-- step_time_cuda:end -->",
             "## QAT step time on a GPU (`benchmarks/step_time.py --device cuda`)"),
}


def demo() -> nn.Module:
    from qatkit.apps.runconfig import RunConfig
    from qatkit.apps.stages import load_float

    return load_float(RunConfig(quiet=True).float_checkpoint)


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def yolov8n() -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", verbose=False)


CASES = {"demo b16 160px": (demo, 16, 160), "resnet18 b8 160px": (resnet18, 8, 160),
         "yolov8n b8 320px": (yolov8n, 8, 320), "resnet18 b2 32px": (resnet18, 2, 32)}


def loss_of(out) -> torch.Tensor:
    """Mean square of every floating tensor in a (nested) output: one loss for every tool and model."""
    if isinstance(out, torch.Tensor):
        return out.float().square().mean() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    items = out.values() if isinstance(out, dict) else out
    return sum((loss_of(o) for o in items if isinstance(o, (torch.Tensor, list, tuple, dict))), torch.zeros(()))


def qatkit_model(recipe: str, frozen: bool) -> Callable:
    def build(model: nn.Module, batches: list) -> nn.Module:
        qm = qatkit.quantize(copy.deepcopy(model), recipe, (batches[0][:1],))
        qatkit.calibrate(qm, batches, method="max")
        return qatkit.freeze(qm, bn=True) if frozen else qm
    return build


def peer_model(tool) -> Callable:
    def build(model: nn.Module, batches: list) -> nn.Module:
        return tool.qat(tool.ptq(model, batches))
    return build


class CompiledCall(nn.Module):
    """``torch.compile`` of a function that calls the model (so the model's own hooks are traced into the graph;
    ``torch.compile(model)`` of a class not from torch.nn runs them outside it, docs/performance.md)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.__dict__["_fn"] = torch.compile(lambda x: model(x))

    def forward(self, x: torch.Tensor):
        return self._fn(x)


def compiled(build: Callable | None) -> Callable:
    def make(model: nn.Module, batches: list) -> nn.Module:
        return CompiledCall(build(model, batches) if build else copy.deepcopy(model))
    return make


VARIANTS: dict[str, tuple[Callable | None, bool]] = {  # name -> (builder, compiled)
    "float": (None, False),
    "qatkit onnxruntime, BN frozen": (qatkit_model("onnxruntime", True), False),
    "qatkit onnxruntime, BN live": (qatkit_model("onnxruntime", False), False),
    "qatkit tensorrt, BN live": (qatkit_model("tensorrt", False), False),
    "qatkit tensorrt, BN frozen": (qatkit_model("tensorrt", True), False),
    "ModelOpt INT8_DEFAULT_CFG": (peer_model(ModelOpt()), False),
    "torchao PT2E QAT": (peer_model(TorchaoPT2E()), False),
    "compiled float": (compiled(None), True),
    "compiled qatkit onnxruntime, BN frozen": (compiled(qatkit_model("onnxruntime", True)), True),
}


def step_time(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps on ``x``; on a GPU each ends after ``torch.cuda.synchronize()``
    (the kernels run asynchronously: without it the time is only the time to queue them)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    sync = torch.cuda.synchronize if x.is_cuda else None
    if sync:
        sync()  # nothing queued before the first step is counted in it
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loss_of(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def measure(case: str, rounds: int, steps: int, variants: list[str], device: str = "cpu") -> dict[str, float | str]:
    """Median step of each variant on ``case``, on ``device`` (the batches are drawn on the CPU, so both devices
    see the same values); a variant that cannot be built or run gets a "failed: ..." string instead."""
    build_float, batch, size = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    calib = [torch.rand(batch, 3, size, size, generator=g).to(device) for _ in range(2)]
    float_model = build_float().to(device)
    models, out = {}, {}
    for name in variants:
        build, _ = VARIANTS[name]
        try:
            models[name] = build(float_model, calib) if build else copy.deepcopy(float_model)
            step_time(models[name], x, 2)  # warm-up: allocators, compiled kernels, torch.compile
        except Exception as e:  # noqa: BLE001 - a tool that cannot handle the model gets a cell saying why
            out[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            models.pop(name, None)
        print(f"{case}: {name} ready", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name] += step_time(model, x, steps)[1:]
    out.update({n: statistics.median(t) for n, t in times.items()})
    return out


def _cell(value, base) -> str:
    if isinstance(value, str):
        return value
    ratio = f" ({value / base:.2f}x)" if isinstance(base, float) else ""
    return f"{value * 1000:.0f} ms{ratio}"


def table(results: dict[str, dict], variants: list[str]) -> list[str]:
    lines = ["| variant | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for name in variants:
        base_name = "compiled float" if VARIANTS[name][1] else "float"
        cells = [_cell(r.get(name, "not run"), r.get(base_name)) for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def machine(device: str) -> str:
    """The machine the figures come from: CPU flags on the CPU, the GPU's name (and TF32 use) on cuda."""
    if device == "cuda":
        return (f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, convolutions at fp32 precision "
                f"'{torch.backends.cudnn.conv.fp32_precision}'), {torch.get_num_threads()} torch CPU thread(s) of "
                f"{os.cpu_count()} CPUs; torch {torch.__version__}.")
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile")
                     if f in Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else "?"
    return (f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} CPUs, "
            f"CPU flags: {flags}; torch {torch.__version__}.")


def write_doc(doc: Path, lines: list[str], command: str, device: str = "cpu") -> None:
    """Write the table into ``doc`` between ``device``'s markers (appended with its heading where the page has none;
    a missing page is created)."""
    begin, end, heading = MARKERS[device]
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_block(doc, begin, end, [f"Command: `{command}`. {machine(device)} Median step; in brackets the ratio to the "
                                  "float step of the same run (compiled rows: to the compiled float step).", "",
                                  *lines], heading)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"),
                    help="page to write the table into, created if missing ('': only print the table)")
    ap.add_argument("--device", default="cpu", choices=list(MARKERS))
    ap.add_argument("--rounds", type=int, default=6,
                    help="alternating rounds (at 3, ratios at tiny inputs moved by up to 0.1 between runs)")
    ap.add_argument("--steps", type=int, default=4, help="steps per round (the first of each is dropped)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (0: torch's choice; default 1 on cpu, torch's choice on cuda)")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
                 "(torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU, or use --device cpu")
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    results = {case: measure(case, args.rounds, args.steps, args.variants, args.device) for case in args.cases}
    lines = table(results, args.variants)
    print("\n".join(lines))
    command = "python " + " ".join(["benchmarks/step_time.py", *sys.argv[1:]])
    if args.doc:
        write_doc(Path(args.doc), lines, command, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
