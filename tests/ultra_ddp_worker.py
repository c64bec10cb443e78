"""One rank of tests/test_ultralytics_trainer.py's DDP test: run it with torchrun --nproc_per_node 2.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ultra_ddp_worker.py DATA FLOAT_PT PROJECT OUT

Each rank QAT-trains the same float model for one epoch with qatkit.integrations.ultralytics.train (CPU, gloo) and
writes OUT/rank<r>.json: a hash of its quantizer state right after calibration and at the end, and what its trainer
used (world size, its training shard, the DDP wrapper).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from ultralytics import YOLO
from ultralytics.utils.torch_utils import unwrap_model

from qatkit.integrations.ultralytics import train


def quantizer_hash(model: torch.nn.Module) -> str:
    """sha256 of the quantizer state (``model._qatkit.state_dict()``: scales, zero points, ranges, flags)."""
    h = hashlib.sha256()
    for name, t in sorted(model._qatkit.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    data, float_pt, project, out = sys.argv[1:5]
    rank = int(os.environ["RANK"])
    record: dict = {"rank": rank}

    def calibrated(trainer) -> None:
        record["calibrated"] = quantizer_hash(unwrap_model(trainer.model))
        record["calibration_images"] = trainer.calibration.images

    def started(trainer) -> None:
        sampler = trainer.train_loader.sampler
        record["world_size"] = trainer.world_size
        record["sampler"] = type(sampler).__name__
        record["shard"] = len(sampler)
        record["dataset"] = len(trainer.train_loader.dataset)
        record["ddp"] = type(trainer.model.module).__name__

    result = train(YOLO(float_pt), data=data, recipe="onnxruntime", epochs=1, calib_batches=2, imgsz=64, batch=8,
                   workers=0, plots=False, device="cpu", project=project, name="ddp", exist_ok=True,
                   callbacks={"on_qat_calibrate_end": calibrated, "on_train_start": started})
    record["final"] = quantizer_hash(result.model)
    record["last"] = str(result.last)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
