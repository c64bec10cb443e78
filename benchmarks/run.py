"""`make bench`: qatkit against the peer tools on the same demo detector, data and machine, in one run.

Tools: qatkit (onnxruntime recipe), ONNX Runtime's `quantize_static` (QDQ U8S8, MinMax and Entropy), NNCF, torchao
PT2E (X86InductorQuantizer) and NVIDIA ModelOpt (INT8 on CPU); see benchmarks/peers.py for how each is driven.
Per tool: PTQ mAP and QAT mAP (PyTorch), exported ORT int8 mAP, ORT fp32/int8 speed ratio, calibration time
relative to a plain forward pass over the same batches, and QAT step time relative to a float step. Every tool
gets the same calibration batches, QAT schedule (the demo's: AdamW, lr 1e-4, batch 16) and evaluation. A stage
that fails is reported with its error, not dropped. Writes docs/benchmarks.md with the machine, versions and
command.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import onnxruntime
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

sys.path.insert(0, str(Path(__file__).parent))
from peers import PEERS, Qatkit  # noqa: E402

import qatkit  # noqa: E402
from qatkit.targets import ort  # noqa: E402
from qatkit.apps.data import collate  # noqa: E402
from qatkit.apps.eval.detect import evaluate, torch_predictor  # noqa: E402
from qatkit.apps.runconfig import RunConfig  # noqa: E402
from qatkit.apps.stages import datasets, image_batches, load_float  # noqa: E402
from qatkit.apps.train_loop import TrainConfig, train_detector  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._it = iter([{"images": b[i:i + 1].numpy()} for b in batches for i in range(len(b))])

    def get_next(self):
        return next(self._it, None)


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _qat(model, train, cfg: RunConfig, steps: int) -> tuple[torch.nn.Module, float]:
    """The demo's QAT schedule; returns the model and the mean step time in seconds."""
    tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.qat_lr, warmup=min(20, steps), ema_decay=None,
                     seed=cfg.seed + 1)
    start = time.perf_counter()
    out = train_detector(model, train, tc, collate, quiet=True, description="qat")
    return out, (time.perf_counter() - start) / steps


def run_tool(tool, float_model, batches, train, val, cfg, steps, out: Path, forward_s: float, float_step_s: float):
    row: dict = {"tool": tool.name}
    example = batches[0][:1]
    try:
        start = time.perf_counter()
        model = tool.ptq(float_model, batches)
        row["calib_ratio"] = (time.perf_counter() - start) / forward_s
        row["ptq_map"] = evaluate(torch_predictor(model), val)["map"]
    except Exception as e:  # noqa: BLE001 - a failing peer is reported, not dropped
        row["error"] = f"PTQ: {_short(e)}"
        return row, None
    try:
        qm = tool.qat(model)
        qm, step_s = _qat(qm, train, cfg, steps)
        row["step_ratio"] = step_s / float_step_s
        model = tool.after_qat(qm) if hasattr(tool, "after_qat") else qm
        row["qat_map"] = evaluate(torch_predictor(model), val)["map"]
    except Exception as e:  # noqa: BLE001
        row["qat_error"] = _short(e)
    try:
        path = tool.export(model, example, out / f"{tool.__class__.__name__}.onnx")
        row["ort_map"] = evaluate(ort.predictor(ort.session(path)), val)["map"]
        return row, path
    except Exception as e:  # noqa: BLE001
        row["export_error"] = _short(e)
        return row, None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--qat-steps", type=int, default=300)
    ap.add_argument("--latency-runs", type=int, default=200)
    args = ap.parse_args()
    started = time.time()
    cfg = RunConfig(quiet=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = datasets(cfg)
    batches = list(image_batches(train, cfg.calib_batches, cfg.batch_size, cfg.seed))
    float_model = load_float(cfg.float_checkpoint)
    with torch.no_grad():
        start = time.perf_counter()
        for b in batches:
            float_model(b)
        forward_s = time.perf_counter() - start
    _, float_step_s = _qat(copy.deepcopy(float_model), train, cfg, 20)
    fp32 = qatkit.export_onnx(float_model, (batches[0][:1],), out / "model.fp32.onnx")
    float_map = evaluate(torch_predictor(float_model), val)["map"]

    rows, paths = [], {}
    for tool in [Qatkit()] + [p() for p in PEERS]:
        row, path = run_tool(tool, float_model, batches, train, val, cfg, args.qat_steps, out, forward_s,
                             float_step_s)
        rows.append(row)
        paths[row["tool"]] = path
        print(row, flush=True)
    for label, method in (("ORT quantize_static MinMax", CalibrationMethod.MinMax),
                          ("ORT quantize_static Entropy", CalibrationMethod.Entropy)):
        row = {"tool": label}
        try:
            path = out / f"ort_{method.name.lower()}.onnx"
            start = time.perf_counter()
            quantize_static(str(fp32), str(path), _Reader(batches), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=True, calibrate_method=method)
            row["calib_ratio"] = (time.perf_counter() - start) / forward_s
            row["ort_map"] = evaluate(ort.predictor(ort.session(path)), val)["map"]
            paths[label] = path
        except Exception as e:  # noqa: BLE001
            row["error"] = _short(e)
        rows.append(row)

    shape = (1, 3, cfg.img_size, cfg.img_size)  # latency last, all models in alternating rounds
    times: dict[str, list[float]] = {"fp32": []} | {k: [] for k, p in paths.items() if p is not None}
    for _ in range(2):
        times["fp32"].append(ort.latency_ms(fp32, shape, runs=args.latency_runs))
        for k in times:
            if k != "fp32":
                times[k].append(ort.latency_ms(paths[k], shape, runs=args.latency_runs))
    fp32_ms = statistics.median(times["fp32"])
    for row in rows:
        if row["tool"] in times:
            row["int8_ms"] = statistics.median(times[row["tool"]])
    write_doc(Path(args.doc), rows, float_map, fp32_ms, cfg, args, time.time() - started)
    return 0


def _cell(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "-"


def write_doc(doc: Path, rows: list[dict], float_map: float, fp32_ms: float, cfg: RunConfig, args, seconds: float):
    import importlib.metadata as md

    versions = []
    for pkg in ("torch", "onnxruntime", "nncf", "torchao", "nvidia-modelopt"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            versions.append(f"{pkg} not installed")
    lines = [
        "# Benchmarks: qatkit vs peer tools", "",
        f"Command: `make bench` (= `python benchmarks/run.py`, then speed.py and qat_overhead.py), "
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads; {', '.join(versions)}; onnxruntime {onnxruntime.__version__}.", "",
        f"Demo detector (shipped float checkpoint, float mAP {float_map:.4f}), 500 held-out generated images, COCO "
        f"mAP@0.5:0.95. Calibration: the same {cfg.calib_batches} batches of {cfg.batch_size} for every tool. "
        f"QAT: {args.qat_steps} steps, AdamW lr {cfg.qat_lr}, batch {cfg.batch_size}, for every tool. Latency: ORT "
        f"CPU, batch 1, median of 2 alternating rounds of {args.latency_runs} runs; fp32 ONNX {fp32_ms:.2f} ms.", "",
        "| tool | PTQ mAP | QAT mAP | ORT int8 mAP | fp32/int8 speed | calibration / forward | QAT step / float step |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        speed = f"{fp32_ms / r['int8_ms']:.2f}x" if "int8_ms" in r else "-"
        lines.append(f"| {r['tool']} | {_cell(r, 'ptq_map', '{:.4f}')} | {_cell(r, 'qat_map', '{:.4f}')} | "
                     f"{_cell(r, 'ort_map', '{:.4f}')} | {speed} | {_cell(r, 'calib_ratio', '{:.1f}x')} | "
                     f"{_cell(r, 'step_ratio', '{:.2f}x')} |")
        for key in ("error", "qat_error", "export_error"):
            if key in r:
                notes.append(f"- {r['tool']}, {key.replace('_', ' ')}: `{r[key]}`")
    if notes:
        lines += ["", "Failures (reported, not dropped):", ""] + notes
    lines += ["", f"Total benchmark time {seconds:.0f} s."]
    doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
