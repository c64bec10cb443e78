"""QAT step time vs float step time on the demo detector (a benchmark, not a test).

Run by hand (`make bench` runs benchmarks/step_time.py instead); writes docs/qat_overhead.md. One step = forward,
detection loss, backward, AdamW step, on the same batches (batch 16, 160x160 unless ``--batch``/``--size`` say
otherwise: smaller images are the dataset's, resized, boxes scaled alike) from the shipped float checkpoint; the
quantized models are calibrated first, with BN live (as QAT starts) and, for comparison, frozen. Rounds alternate
float and quantized so that machine noise hits both alike; each figure is the median step time over all rounds.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qatkit
from qatkit.apps.data import collate
from qatkit.apps.models.loss import detection_loss
from qatkit.apps.runconfig import RunConfig
from qatkit.apps.stages import datasets, image_batches, load_float
from qatkit.apps.train_loop import infinite_batches

ROOT = Path(__file__).resolve().parents[1]


def step_times(model: torch.nn.Module, batches: list, steps: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for images, targets in batches[:steps]:
        t0 = time.perf_counter()
        loss, _ = detection_loss(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[2:]  # first steps warm up allocators and kernels


def resized(batch: tuple, size: int) -> tuple:
    """A (images, targets) batch at ``size`` x ``size`` pixels, box coordinates scaled alike."""
    images, targets = batch
    if images.shape[-1] == size:
        return batch
    f = size / images.shape[-1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, [{**t, "boxes": t["boxes"] * f} for t in targets]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--doc", default=str(ROOT / "docs" / "qat_overhead.md"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the run config's, 16)")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: the run config's, 160)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(quiet=True)
    batch, size = args.batch or cfg.batch_size, args.size or cfg.img_size
    train, _ = datasets(cfg)
    it = infinite_batches(train, batch, 0, collate)
    batches = [resized(next(it), size) for _ in range(args.steps)]
    float_model = load_float(cfg.float_checkpoint)
    models = {"float": float_model}
    for name, recipe in (("onnxruntime", "onnxruntime"), ("onnxruntime, BN frozen", "onnxruntime"),
                         ("tensorrt", "tensorrt")):
        qm = qatkit.quantize(copy.deepcopy(float_model), recipe, (torch.zeros(1, 3, size, size),))
        calib = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if size != cfg.img_size
                 else x for x in image_batches(train, 4, batch, 0))
        qatkit.calibrate(qm, calib, method="max")
        models[name] = qatkit.freeze(qm, bn=True) if "frozen" in name else qm
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name] += step_times(model, batches, args.steps)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    lines = [
        "# QAT step time vs float step time", "",
        f"Command: `python {' '.join(['benchmarks/qat_overhead.py', *sys.argv[1:]])}` (run by hand), "
        f"{time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "", f"Demo detector, batch {batch}, {size}x{size}; median of "
        f"{len(times['float'])} steps per model over {args.rounds} alternating rounds.", "",
        "| model | step ms | vs float |", "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} | {v / med['float']:.2f}x |" for k, v in med.items()]
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
