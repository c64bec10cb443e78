"""The run configuration shared by the CLI stages and the demo: model, data, recipe and stage options.

A YAML file (``--config run.yaml``) sets any of these keys; command-line flags override it. Unknown keys are errors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import QatkitError

ASSETS = Path(__file__).parent / "assets"
DEMO_FLOAT = ASSETS / "demo_float.pt"
# `qatkit run`'s default: YOLO11n trained by `make default-yolo` on the clutter set below (docs/ultralytics.md)
DEFAULT_YOLO = ASSETS / "yolo11n_clutter.pt"
CLUTTER = {"root": Path("data/clutter"), "n_train": 2000, "n_val": 300, "img_size": 256, "seed": 0}


def default_yolo(data: str | Path | None = None) -> tuple[str, str]:
    """``qatkit run``'s defaults: the shipped YOLO and its data.yaml (the clutter set, generated when missing).

    Args:
        data: a data.yaml to use instead of the clutter set.

    Example:
        >>> model, data = default_yolo()   # ("<assets>/yolo11n_clutter.pt", "data/clutter/data.yaml")
    """
    if data is None:
        from .data.shapes import generate_shapes

        spec = dict(CLUTTER)
        data = generate_shapes(spec.pop("root"), format="yolo", kind="clutter", **spec) / "data.yaml"
    return str(DEFAULT_YOLO), str(data)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a COCO-format dataset root (the shapes set is generated there when missing) or an ultralytics data.yaml
    data: Path = Path("data/shapes")
    generate: bool = True  # generate the shapes dataset at `data` when missing
    img_size: int = Field(160, ge=32)
    n_train: int = Field(3000, ge=1)
    n_val: int = Field(500, ge=1)
    # the float model (docs/models.md): demo (the detector from float_checkpoint), an ultralytics yaml or `yolo
    # train` .pt, or package.module:factory
    model: str = "demo"
    float_checkpoint: Path = DEMO_FLOAT
    recipe: str | dict = "onnxruntime"  # built-in name, a .yaml path, or a recipe dict
    method: str = "mse"  # calibrator for PTQ
    bias_correction: bool = False  # PTQ: qatkit.correct_bias after calibration (docs/ptq.md)
    calib_batches: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1)
    qat_steps: int = Field(300, ge=0)
    qat_lr: float = Field(1e-4, gt=0)
    # QAT step from which BN uses running statistics (None: never). 0 for the demo's short fine-tuning of a converged
    # model: its statistics are already right, and live BN at batch 16 cost 0.005 mAP (docs/results.md)
    freeze_bn_step: int | None = Field(0, ge=0)
    freeze_scales_step: int | None = Field(None, ge=0)  # QAT step from which activation scales stop changing
    checkpoint_every: int = Field(0, ge=0)  # QAT steps between resumable training-state checkpoints
    distill: bool = False  # QAT loss + MSE to the float model's raw outputs (train.distill)
    distill_weight: float = Field(1.0, gt=0)
    distill_features: list[str] = []  # module names whose outputs are matched too (feature-level)
    float_steps: int = Field(3000, ge=1)
    float_lr: float = Field(2e-3, gt=0)
    seed: int = 0
    out: Path = Path("runs/demo")
    latency_runs: int = Field(200, ge=1)
    quiet: bool = False
    report: bool = True  # demo: write report.html / report.md (sensitivity sweep, histograms, quantizer table)
    # demo: "rknn" also compiles model.rknn for `platform` and checks it in rknn-toolkit2's simulator (docs/targets.md)
    target: Literal["onnx", "rknn"] = "onnx"
    platform: str = "rk3588"


def load_run_config(path: str | Path | None, **overrides) -> RunConfig:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise QatkitError(f"run config {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise QatkitError(f"run config {p} must be a mapping of keys")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown key {key!r}; valid keys: {', '.join(RunConfig.model_fields)}")
            else:
                msgs.append(f"{key}: {err['msg']}")
        raise QatkitError("invalid run config: " + "; ".join(msgs)) from None
