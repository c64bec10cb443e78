"""Train `qatkit run`'s default model: YOLO11n from scratch on the generated clutter set, by plain ultralytics.

Usage: python scripts/train_default_yolo.py   (`make default-yolo`; CPU: 36 + 29 min on the shared 2-core development machine)

Stage 1: `yolo train model=yolo11n.yaml` for 25 epochs. Stage 2: 20 more epochs from stage 1's last weights (a
fresh schedule: warm-up, then mosaic off for the last 10), because 25 epochs from scratch on 2 cores stop well short
of convergence. The final best.pt (ultralytics strips the optimizer; fp16, about 5 MB) is copied to
src/qatkit/apps/assets/yolo11n_clutter.pt. Nothing is downloaded: the data set is generated, the model built from
its yaml.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
from ultralytics import YOLO  # noqa: E402

from qatkit.apps.runconfig import DEFAULT_YOLO, default_yolo  # noqa: E402

COMMON = dict(imgsz=256, batch=32, device="cpu", workers=0, seed=0, deterministic=True, plots=False, exist_ok=True)
STAGES = (("stage1", "yolo11n.yaml", 25), ("stage2", "stage1", 20))


def main() -> int:
    _, data = default_yolo()
    project = Path("runs/default-yolo").resolve()
    weights: dict[str, Path] = {}
    for name, start, epochs in STAGES:
        model = str(weights[start] / "last.pt") if start in weights else start
        YOLO(model).train(data=data, epochs=epochs, project=str(project), name=name, **COMMON)
        weights[name] = project / name / "weights"
    shutil.copyfile(weights[STAGES[-1][0]] / "best.pt", DEFAULT_YOLO)
    print(f"wrote {DEFAULT_YOLO} ({DEFAULT_YOLO.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
