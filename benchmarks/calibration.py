"""Calibration time vs a plain forward pass on the demo detector (a benchmark, not a test).

What ``qatkit.calibrate`` costs with each calibrator (max, mse, entropy, percentile) on the demo's calibration
batches (16 batches of 16 images at 160 px, the shipped float checkpoint, the ``onnxruntime`` recipe), relative to
the float model's forward over the same batches, split into *observe* (the forward passes with the calibrators
collecting statistics) and *search* (``stop_observing``: each quantizer turning its statistics into a range).
``--model yolov8n`` / ``resnet18`` times those models instead (built as ``benchmarks/step_time.py`` builds them, with
random weights, on 8 batches of random images; print them with ``--doc ''``). Quantizers of a range fixed in advance
(the SiLU's sigmoid under the ``onnxruntime`` recipe) are not calibrated and not counted.
Each calibration starts from a freshly quantized model, so that the rounds are independent.
``hooks only`` is the quantized model's forward with fake-quant off and nothing observing: the floor calibration
cannot go below without changing the run time (qatkit/runtime/).

Times are CPU seconds of this process (all threads, ``time.process_time``): on a shared machine they move less
than wall time when other processes take the cores. Wall seconds are shown beside them: the forward runs its convs
on all threads, calibration's Python on one, so the wall ratio is the higher one. ``--baseline REV`` also times
the calibrators of git revision REV (calibrators.py, histogram.py and mse_search.py loaded from git into this
process), alternating with the working tree's in every round so that before and after share the machine's noise,
and reports how far the ranges they chose differ. Each figure is the median over ``--rounds`` rounds. The table
and its command go into the calibration block of ``--doc`` (docs/calibration.md; ``make bench`` runs ``--methods
max,mse``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

# As the qatkit CLI runs (qatkit/__init__.py): OpenMP threads that spin-wait would count as CPU time and, on a shared
# machine, stall every parallel region. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import qatkit  # noqa: E402
from qatkit.quant import quantizer as quantizer_module  # noqa: E402
from qatkit.quant.quantizer import FakeQuantizer  # noqa: E402
from qatkit.apps.runconfig import RunConfig  # noqa: E402
from qatkit.apps.stages import datasets, image_batches, load_float  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from doc_block import write_block  # noqa: E402 - the helper lives beside this script

BEGIN, END = "<!-- calibration:begin -->", "<!-- calibration:end -->"
METHODS = ("max", "mse", "entropy", "percentile")


_BASELINE_MODULES = ("histogram", "mse_search", "calibrators")  # in import order; a missing one is skipped


def _load_from_git(rev: str, name: str) -> ModuleType | None:
    """Import ``src/qatkit/quant/<name>.py`` as it is at ``rev`` as ``qatkit.quant._baseline_<name>``, its imports
    of the other baseline modules pointed at their baseline copies; None if ``rev`` has no such file."""
    shown = subprocess.run(["git", "show", f"{rev}:src/qatkit/quant/{name}.py"], cwd=ROOT, capture_output=True,
                           text=True)
    if shown.returncode != 0:
        return None
    source = shown.stdout
    for other in _BASELINE_MODULES:
        source = source.replace(f"from .{other} import", f"from ._baseline_{other} import")
    full = f"qatkit.quant._baseline_{name}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(full, loader=None))
    module.__package__ = "qatkit.quant"
    sys.modules[full] = module
    exec(compile(source, f"{rev}:src/qatkit/quant/{name}.py", "exec"), module.__dict__)
    return module


def baseline_factory(rev: str) -> Callable:
    """``make_calibrator`` of git revision ``rev`` (its calibrators, histogram and MSE search)."""
    modules = {name: _load_from_git(rev, name) for name in _BASELINE_MODULES}
    if modules["calibrators"] is None:
        raise SystemExit(f"{rev} has no src/qatkit/quant/calibrators.py")
    return modules["calibrators"].make_calibrator


@contextlib.contextmanager
def calibrators_from(factory: Callable | None) -> Iterator[None]:
    """Make quantizers build their calibrators with ``factory`` (None: the working tree's)."""
    current = quantizer_module.make_calibrator
    quantizer_module.make_calibrator = factory or current
    try:
        yield
    finally:
        quantizer_module.make_calibrator = current


@contextlib.contextmanager
def search_timer(total: list[float]) -> Iterator[None]:
    """Accumulate the time spent in ``FakeQuantizer.stop_observing`` (the range search) into ``total[0]``."""
    original = FakeQuantizer.stop_observing

    def timed(self: FakeQuantizer) -> None:
        start = time.process_time()
        try:
            original(self)
        finally:
            total[0] += time.process_time() - start

    FakeQuantizer.stop_observing = timed
    try:
        yield
    finally:
        FakeQuantizer.stop_observing = original


def time_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(CPU, wall) seconds of the forward over ``batches``."""
    with torch.no_grad():
        start, wall = time.process_time(), time.perf_counter()
        for b in batches:
            model(b)
        return time.process_time() - start, time.perf_counter() - wall


def time_calibration(qm: torch.nn.Module, batches: list[torch.Tensor], method: str,
                     factory: Callable | None) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    """(total CPU, total wall, search CPU) seconds of one ``qatkit.calibrate`` with ``method``, and the ranges it
    chose."""
    search = [0.0]
    with calibrators_from(factory), search_timer(search):
        start, wall = time.process_time(), time.perf_counter()
        qatkit.calibrate(qm, batches, method=method)
        total, wall = time.process_time() - start, time.perf_counter() - wall
    ranges = {q.name: torch.stack([q.range_lo, q.range_hi]).flatten()
              for q in qatkit.quantization_state(qm).quantizers.values() if not q.dynamic}
    return total, wall, search[0], ranges


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float(((a[k] - b[k]).abs() / a[k].abs().clamp(min=1e-30)).max()) for k in a)


def hooks_only(qm: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """The quantized model's forward as calibration runs it (fake-quant off), nothing observing."""
    quantizers = qatkit.quantization_state(qm).quantizers.values()
    for q in quantizers:
        q.enable_fake_quant(False)
    try:
        return time_forward(qm.eval(), batches)
    finally:
        for q in quantizers:
            q.enable_fake_quant(True)


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    present = set(flags.split(":", 1)[1].split())
    return ", ".join(f"{f} {'yes' if f in present else 'no'}" for f in wanted)


OTHER_MODELS = {"yolov8n": ("yolov8n", 8, 320), "resnet18": ("resnet18", 8, 160)}  # step_time's builder, batch, px


def model_and_batches(name: str, n: int | None) -> tuple[torch.nn.Module, list[torch.Tensor], str]:
    """The float model (eval mode), its calibration batches and its description."""
    if name == "demo":
        cfg = RunConfig(quiet=True)
        train, _ = datasets(cfg)
        batches = list(image_batches(train, n or cfg.calib_batches, cfg.batch_size, cfg.seed))
        return load_float(cfg.float_checkpoint).eval(), batches, "Demo detector"
    import step_time  # benchmarks/ is on sys.path (doc_block above)

    builder, batch, px = OTHER_MODELS[name]
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(batch, 3, px, px, generator=g) for _ in range(n or 8)]
    return getattr(step_time, builder)().eval(), batches, f"{name} (random weights, random images)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=None, help="calibration batches (default: the demo's, 16)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--recipe", default="onnxruntime")
    ap.add_argument("--model", choices=("demo", *OTHER_MODELS), default="demo",
                    help="demo: the shipped checkpoint on the demo's calibration images; the others as "
                         "benchmarks/step_time.py builds them (random weights), on random images")
    ap.add_argument("--baseline", default=None, help="git revision whose calibrators are timed alongside")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "calibration.md"),
                    help="the page whose calibration block gets the table and command ('' to print only)")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    float_model, batches, what = model_and_batches(args.model, args.batches)
    qm = qatkit.quantize(copy.deepcopy(float_model), args.recipe, (batches[0][:1],))
    n_quantizers = sum(not (q.dynamic or getattr(q, "fixed_range", False))  # (older qatkit: no fixed ranges)
                       for q in qatkit.quantization_state(qm).quantizers.values())
    variants: dict[str, Callable | None] = {"now": None}
    if args.baseline:
        variants = {f"{args.baseline}": baseline_factory(args.baseline), "now": None}
    time_forward(float_model, batches[:2])  # warm-up
    hooks_only(qm, batches[:2])
    times: dict[tuple[str, ...], list[float]] = {}
    chosen: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for r in range(args.rounds):
        for row, timed in (("float", time_forward(float_model, batches)), ("hooks", hooks_only(qm, batches))):
            times.setdefault((row,), []).append(timed[0])
            times.setdefault((row, "wall"), []).append(timed[1])
        for method in methods:
            for label, factory in variants.items():
                fresh = qatkit.quantize(copy.deepcopy(float_model), args.recipe, (batches[0][:1],))
                total, wall, search, chosen[method, label] = time_calibration(fresh, batches, method, factory)
                times.setdefault((method, label, "total"), []).append(total)
                times.setdefault((method, label, "wall"), []).append(wall)
                times.setdefault((method, label, "search"), []).append(search)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd, fwd_wall = med[("float",)], med[("float", "wall")]
    command = "python benchmarks/calibration.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{command}`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. CPU flags: {cpu_flags()}.",
        "",
        f"{what}, `{args.recipe}` recipe ({n_quantizers} calibrated activation quantizers), {len(batches)} batches "
        f"of {batches[0].shape[0]} at {batches[0].shape[-1]} px; median of {args.rounds} alternating rounds.",
        "",
        "| what | calibrator code | CPU s | x float forward | wall s | x float wall | observe s | search s |",
        "|---|---|---|---|---|---|---|---|",
        f"| float forward | - | {fwd:.2f} | 1.00x | {fwd_wall:.2f} | 1.00x | - | - |",
        f"| hooks only (fake-quant off) | - | {med[('hooks',)]:.2f} | {med[('hooks',)] / fwd:.2f}x | "
        f"{med[('hooks', 'wall')]:.2f} | {med[('hooks', 'wall')] / fwd_wall:.2f}x | - | - |",
    ]
    for method in methods:
        for label in variants:
            total, search, wall = (med[(method, label, k)] for k in ("total", "search", "wall"))
            lines.append(f"| calibrate {method} | {label} | {total:.2f} | {total / fwd:.2f}x | {wall:.2f} | "
                         f"{wall / fwd_wall:.2f}x | {total - search:.2f} | {search:.2f} |")
    if args.baseline:
        lines += ["", f"Chosen ranges, working tree vs {args.baseline}, max relative difference over all quantizers: "
                  + ", ".join(f"{m} {max_relative_difference(chosen[m, args.baseline], chosen[m, 'now']):.3g}"
                              for m in methods) + "."]
    print("\n".join(lines))
    if args.doc:
        write_block(Path(args.doc), BEGIN, END, lines, "## Figures of the last `make bench`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
