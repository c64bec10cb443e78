"""PTQ with and without bias correction (``qatkit.correct_bias``), per recipe and calibrator (a benchmark).

Demo detector: the shipped float checkpoint, ``qatkit calibrate``'s batches (16 of 16 training images), mAP on the
500 generated val images. Shipped YOLO11n: 16 batches of 16 clutter training images (``yolo val``'s letterbox) at
256 px, mAP@0.5:0.95 on the clutter val split as ``yolo val`` computes it. Bias correction on the first 8 of the
calibration batches, one pass. `make bench` runs it and writes the table into docs/ptq.md with this command and
the machine; ``--doc ''`` only prints it.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import qatkit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from doc_block import write_block  # noqa: E402
from step_time import machine  # noqa: E402

BEGIN, END = "<!-- bias_correction:begin -->", "<!-- bias_correction:end -->"
HEADING = "## Bias correction, measured (`benchmarks/bias_correction.py`)"


def demo_case():
    """(float model, calibration batches, mAP function) of the demo detector."""
    from qatkit.apps.eval.detect import evaluate, torch_predictor
    from qatkit.apps.runconfig import RunConfig
    from qatkit.apps.stages import datasets, image_batches, load_float

    cfg = RunConfig(quiet=True)
    train, val = datasets(cfg)
    batches = list(image_batches(train, cfg.calib_batches, cfg.batch_size, cfg.seed))
    return load_float(cfg.float_checkpoint).eval(), batches, lambda m: evaluate(torch_predictor(m.eval()), val)["map"]


def yolo11n_case():
    """The same for the shipped YOLO11n on the clutter set (generated where missing, as `qatkit run` does)."""
    from ultralytics import YOLO

    from qatkit.apps.eval.predictors import torch_predictor
    from qatkit.apps.eval.yolo_map import yolo_images, yolo_map
    from qatkit.apps.runconfig import default_yolo

    weights, data = default_yolo()  # (the clutter set generated where missing)
    model = YOLO(str(weights)).model.float().eval()
    batches = list(yolo_images(data, "train", imgsz=256, batch=16, limit=16 * 16))
    return model, batches, lambda m: yolo_map(torch_predictor(m.eval()), data, imgsz=256, batch=16,
                                              progress=False)["map50_95"]


CASES = {"demo": demo_case, "yolo11n": yolo11n_case}


def measure(case: str, configs: list[tuple[str, str]]) -> list[str]:
    float_model, batches, score = CASES[case]()
    rows = [f"| {case} | float | | {score(float_model):.4f} | | |"]
    for recipe, method in configs:
        qm = qatkit.quantize(copy.deepcopy(float_model), recipe, (batches[0][:1],))
        qatkit.calibrate(qm, batches, method)
        ptq = score(qm)
        start = time.perf_counter()
        report = qatkit.correct_bias(qm, batches[:8])
        seconds = time.perf_counter() - start
        corrected = score(qm)
        rows.append(f"| {case} | {recipe} | {method} | {ptq:.4f} | {corrected:.4f} ({corrected - ptq:+.4f}) | "
                    f"{report.layers} layers, {seconds:.1f} s |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="demo,yolo11n")
    parser.add_argument("--configs", default="onnxruntime:mse,onnxruntime:max,tensorrt:max,npu-uint8:max,rknn:mse",
                        help="comma-separated recipe:method pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", default=str(ROOT / "docs" / "ptq.md"), help="page to write ('' = print)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    lines = ["| model | recipe | calibrator | PTQ mAP | with bias correction | correction |",
             "|---|---|---|---|---|---|"]
    for case in args.cases.split(","):
        lines += measure(case, configs)
    print("\n".join(lines))
    if args.doc:
        command = "python benchmarks/bias_correction.py " + " ".join(sys.argv[1:])
        write_block(Path(args.doc), BEGIN, END, [f"Command: `{command.strip()}`. {machine('cpu')}", "", *lines],
                    HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
