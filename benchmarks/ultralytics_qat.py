"""qatkit's ultralytics integration against ultralytics' own QAT (`yolo train ... quantize=8`, NVIDIA ModelOpt), side
by side on the same float checkpoint, data, epochs and schedule, in one run (a benchmark, not a test).

Usage: python benchmarks/ultralytics_qat.py [--model PT] [--data YAML] [--epochs 1] [--fraction 1.0] [--batch 16]

Rows: a float fine-tune of the same epochs (the time reference), `quantize=8` then `YOLO(best).export(format=
"onnx")`, and qatkit (`qatkit.integrations.ultralytics.train`) with the `onnxruntime` and `tensorrt` recipes then
`qatkit.export_onnx`. Every mAP is ultralytics' (`qatkit.apps.eval.yolo_map`, `yolo val` at rect=False); every ONNX
file is timed in alternating rounds in one process against the same float ONNX. Epoch time counts the training
batches only (on_train_epoch_start -> on_train_epoch_end); setup is pretrain start -> train start, so "calibration"
is a run's setup minus the float run's. A stage that fails is reported with its error. Writes docs/ultralytics.md's
table (between the BENCH markers) with the command, CPU flags and versions.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import onnxruntime  # noqa: E402
import torch  # noqa: E402
import ultralytics  # noqa: E402
from ultralytics import YOLO  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from onnx_latency import cpu_flags  # noqa: E402

import qatkit  # noqa: E402
from qatkit.apps.eval.predictors import onnx_predictor, torch_predictor  # noqa: E402
from qatkit.apps.eval.yolo_map import yolo_map  # noqa: E402
from qatkit.apps.run_yolo import finetune_overrides  # noqa: E402
from qatkit.apps.runconfig import default_yolo  # noqa: E402
from qatkit.integrations.ultralytics import train as qatkit_train  # noqa: E402
from qatkit.targets.ort import latency_ms  # noqa: E402

DOC = Path(__file__).parent.parent / "docs" / "ultralytics.md"
BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"


class Clock:
    """Ultralytics callbacks that time setup (pretrain start -> train start) and each epoch's training batches."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.epochs: list[float] = []

    def callbacks(self) -> dict:
        def mark(name):
            return lambda trainer: self.marks.__setitem__(name, time.perf_counter())

        def epoch_end(trainer):
            self.epochs.append(time.perf_counter() - self.marks["epoch"])

        return {"on_pretrain_routine_start": mark("setup"), "on_train_start": mark("train"),
                "on_train_epoch_start": mark("epoch"), "on_train_epoch_end": epoch_end}

    @property
    def setup_s(self) -> float:
        return self.marks["train"] - self.marks["setup"]

    @property
    def epoch_s(self) -> float:
        return statistics.mean(self.epochs)


def _yolo_with(clock: Clock, model: str) -> YOLO:
    yolo = YOLO(model)
    for event, fn in clock.callbacks().items():
        yolo.add_callback(event, fn)
    return yolo


def run_rows(args, common: dict, score) -> list[dict]:
    rows = []
    clock = Clock()
    _yolo_with(clock, args.model).train(**common, name="float")
    rows.append({"name": "float fine-tune (reference)", "epoch_s": clock.epoch_s, "setup_s": clock.setup_s})
    float_setup = clock.setup_s

    clock, row = Clock(), {"name": "ultralytics `quantize=8` (ModelOpt)"}
    try:
        yolo = _yolo_with(clock, args.model)
        yolo.train(**common, name="modelopt", quantize=8)
        row |= {"epoch_s": clock.epoch_s, "calib_s": clock.setup_s - float_setup}
        qat = YOLO(str(yolo.trainer.best if yolo.trainer.best.exists() else yolo.trainer.last))
        row["torch_map"] = score(torch_predictor(qat.model.float()))
        row["onnx"] = qat.export(format="onnx", imgsz=args.imgsz, device="cpu")
        row["ort_map"] = score(onnx_predictor(row["onnx"]))
    except Exception as e:  # noqa: BLE001 - a failing stage is a result, reported with its error
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows.append(row)

    for recipe in ("onnxruntime", "tensorrt"):
        clock, row = Clock(), {"name": f"qatkit `{recipe}`"}
        try:
            # the clock rides on the YOLO object (its callbacks reach the trainer before __init__ runs them)
            result = qatkit_train(_yolo_with(clock, args.model), recipe=recipe, calib_batches=args.calib_batches,
                                  callbacks={"on_qat_calibrate_end": lambda t: qatkit.freeze(t.model, bn=True)},
                                  **common, name=f"qatkit-{recipe}")
            row |= {"epoch_s": clock.epoch_s, "calib_s": clock.setup_s - float_setup,
                    "own_calib_s": result.calibration_seconds}
            row["torch_map"] = score(torch_predictor(result.model))
            x = torch.zeros(1, 3, args.imgsz, args.imgsz)
            row["onnx"] = str(qatkit.export_onnx(result.model, (x,), Path(args.out) / f"qatkit-{recipe}.qdq.onnx"))
            row["ort_map"] = score(onnx_predictor(row["onnx"]))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def interleaved_latency(paths: dict[str, str], imgsz: int, rounds: int, runs: int) -> dict[str, float]:
    """Median over rounds of each file's median latency (batch 1), every round timing every file."""
    per: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            per[name].append(latency_ms(path, (1, 3, imgsz, imgsz), runs=runs))
    return {k: statistics.median(v) for k, v in per.items()}


def _fmt(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def write_doc(rows: list[dict], float_row: dict, args, seconds: float) -> str:
    ref = rows[0]["epoch_s"]
    lines = [f"Command: `python benchmarks/ultralytics_qat.py {' '.join(sys.argv[1:])}` (`make bench` runs it), "
             f"{seconds / 60:.0f} min. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"CPU flags {cpu_flags()}; torch {torch.__version__}, ultralytics {ultralytics.__version__}, onnxruntime "
             f"{onnxruntime.__version__}. Model `{args.model}`, data `{args.data}`, imgsz {args.imgsz}, "
             f"{args.epochs} epoch(s) at fraction {args.fraction}, batch {args.batch}, AdamW lr {args.lr0} decaying "
             "linearly, no warm-up, no gradient accumulation (`qatkit run`'s schedule), same seed and schedule in "
             "every row; qatkit's rows freeze BN as `qatkit run` does.", "",
             f"Float: {float_row['torch_map']:.4f} mAP@0.5:0.95 in PyTorch, {float_row['ort_map']:.4f} as fp32 ONNX "
             f"in ORT, {float_row['ms']:.2f} ms (batch 1).", "",
             "| QAT | mAP PyTorch | int8 ONNX mAP (ORT) | \\|ORT - PyTorch\\| | ORT ms | int8 speed vs fp32 | "
             "epoch time vs float | calibration (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows[1:]:
        if "error" in row and row.get("ort_map") is None:
            lines.append(f"| {row['name']} | {_fmt(row, 'torch_map', '{:.4f}')} | failed: {row['error']} | | | | | |")
            continue
        gap = abs(row["ort_map"] - row["torch_map"])
        lines.append(f"| {row['name']} | {row['torch_map']:.4f} | {row['ort_map']:.4f} | {gap:.4f} | "
                     f"{_fmt(row, 'ms', '{:.2f}')} | {float_row['ms'] / row['ms']:.2f}x | "
                     f"{row['epoch_s'] / ref:.2f}x | {_fmt(row, 'calib_s', '{:.1f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="default: qatkit run's shipped YOLO11n")
    ap.add_argument("--data", help="default: the clutter set (generated at data/clutter when missing)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--lr0", type=float, default=1e-4, help="AdamW learning rate of every row (qatkit run's default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default="runs/bench_ultralytics")
    args = ap.parse_args(argv)
    if args.model is None or args.data is None:
        model, data = default_yolo(args.data)
        args.model, args.data = args.model or model, data
    start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"data": args.data, "epochs": args.epochs, "fraction": args.fraction, "batch": args.batch,
              "imgsz": args.imgsz, "device": "cpu", "workers": 0, "plots": False, "seed": 0, "deterministic": True,
              "project": str(out), "exist_ok": True, **finetune_overrides(args.lr0, args.batch)}

    def score(predict) -> float:
        return yolo_map(predict, args.data, imgsz=args.imgsz, batch=args.batch, progress=False)["map50_95"]

    float_model = YOLO(args.model).model.float().eval()
    float_row = {"torch_map": score(torch_predictor(float_model))}
    fp32 = qatkit.export_onnx(float_model, (torch.zeros(1, 3, args.imgsz, args.imgsz),), out / "float.onnx")
    float_row["ort_map"] = score(onnx_predictor(fp32))
    rows = run_rows(args, common, score)
    files = {"float": str(fp32)} | {r["name"]: r["onnx"] for r in rows if r.get("onnx")}
    ms = interleaved_latency(files, args.imgsz, args.rounds, args.runs)
    float_row["ms"] = ms["float"]
    for row in rows:
        row["ms"] = ms.get(row["name"])
    table = write_doc(rows, float_row, args, time.time() - start)
    print(table)
    text = DOC.read_text() if DOC.exists() else f"# qatkit in ultralytics' trainer\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
