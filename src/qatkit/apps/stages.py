"""The pipeline stages on the demo detector (or any COCO-format data): each writes what the next one reads.

float -> calibrate (PTQ checkpoint) -> qat (QAT checkpoint) -> export (QDQ ONNX) -> verify (agreement + mAP),
the three-stage flow of seed 001. Checkpoints are qatkit.save files; the float model is a small config+weights file.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..calibrate import calibrate
from ..checkpoint import atomic_save, checkpoint_metadata, header, load, read_checkpoint, save
from .data import CocoDetection, DetectionDataset, YoloDetection, collate, generate_shapes
from .eval.detect import evaluate, torch_predictor
from .model_source import DEMO, ModelSource, infer_source, parse_model, rebuild
from .models.detector import TinyYolo, build_detector, config_dict
from ..ptq import correct_bias
from ..quantize import freeze, quantize
from .runconfig import RunConfig
from ..train.distill import Distiller
from .train_loop import TrainConfig, train_detector

FLOAT_FORMAT = "qatkit-float-1"  # name-version, checked by read_checkpoint (an older/newer version names the fix)


def datasets(cfg: RunConfig) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val) from ``cfg.data``: a ``.yaml``/``.yml`` file is an ultralytics YOLO data.yaml, anything else a
    COCO root (root/annotations/instances_<split>.json), where the shapes set is generated when missing
    (docs/data.md)."""
    root = Path(cfg.data)
    if root.suffix.lower() in (".yaml", ".yml"):
        return YoloDetection(root, "train", cfg.img_size, augment=True), YoloDetection(root, "val", cfg.img_size)
    generated = (root / "meta.json").is_file()  # a real COCO dataset (no meta.json) is never overwritten
    if cfg.generate and (generated or not (root / "annotations" / "instances_val.json").is_file()):
        generate_shapes(root, n_train=cfg.n_train, n_val=cfg.n_val, img_size=cfg.img_size, seed=cfg.seed)
    return CocoDetection(root, "train", cfg.img_size, augment=True), CocoDetection(root, "val", cfg.img_size)


def image_batches(dataset: DetectionDataset, n_batches: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``n_batches`` of images (no targets, no augmentation) drawn reproducibly from ``seed`` alone: what
    calibration needs (augmentation would tie the batches to the global RNG state)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    for b in range(n_batches):
        idx = order[(b * batch_size) % len(order):][:batch_size]
        if not idx:
            return
        yield torch.stack([dataset.image(i) for i in idx])


def val_batches(dataset: DetectionDataset, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])


def save_float(model: TinyYolo, path: str | Path, metadata: dict | None = None) -> Path:
    return atomic_save({**header(FLOAT_FORMAT), "config": config_dict(model), "state_dict": model.state_dict(),
                        "metadata": metadata or {}}, path)


def load_float(path: str | Path) -> TinyYolo:
    ckpt = read_checkpoint(path, FLOAT_FORMAT)
    model = build_detector(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def factory_of(path: str | Path):
    """The float-model factory recorded in a quantized checkpoint's metadata (its model source, see
    :mod:`qatkit.apps.model_source`; a checkpoint without one is the demo detector)."""
    meta = checkpoint_metadata(path)
    return lambda: rebuild(meta.get("model"), meta.get("detector_config"))


def float_model(cfg: RunConfig) -> nn.Module:
    """The run's float model: ``cfg.model`` (demo: the detector from ``cfg.float_checkpoint``)."""
    return parse_model(cfg.model).build(cfg.float_checkpoint)


def train_float(cfg: RunConfig, out: str | Path) -> tuple[TinyYolo, dict]:
    train, val = datasets(cfg)
    model = TinyYolo()
    tc = TrainConfig(steps=cfg.float_steps, batch_size=32, lr=cfg.float_lr, seed=cfg.seed)
    ema = train_detector(model, train, tc, collate, quiet=cfg.quiet, description="train-float")
    metrics = evaluate(torch_predictor(ema), val, quiet=cfg.quiet)
    save_float(ema, out, {"map": metrics["map"], "steps": cfg.float_steps, "seed": cfg.seed})
    return ema, metrics


def ptq(cfg: RunConfig, float_model: nn.Module, train: DetectionDataset) -> nn.Module:
    qm = copy.deepcopy(float_model)
    example = (torch.zeros(1, 3, cfg.img_size, cfg.img_size),)
    quantize(qm, cfg.recipe, example)
    calibrate(qm, image_batches(train, cfg.calib_batches, cfg.batch_size, cfg.seed), cfg.method, quiet=cfg.quiet)
    if cfg.bias_correction:
        correct_bias(qm, image_batches(train, min(cfg.calib_batches, 8), cfg.batch_size, cfg.seed))
    return qm


def qat(cfg: RunConfig, qm: nn.Module, train: DetectionDataset, *, state_path: str | Path | None = None,
        resume: bool = False) -> nn.Module:
    """QAT fine-tuning with the run's freeze schedule; ``state_path`` checkpoints the run for ``resume``."""
    if cfg.qat_steps == 0:
        return qm.eval()
    tc = TrainConfig(steps=cfg.qat_steps, batch_size=cfg.batch_size, lr=cfg.qat_lr, warmup=min(20, cfg.qat_steps),
                     ema_decay=None, seed=cfg.seed + 1, checkpoint_every=cfg.checkpoint_every)
    def freeze_at(step: int):
        return lambda m: freeze(m, bn=step == cfg.freeze_bn_step, scales=step == cfg.freeze_scales_step)

    hooks = {step: freeze_at(step) for step in (cfg.freeze_bn_step, cfg.freeze_scales_step) if step is not None}
    distiller = (Distiller(load_float(cfg.float_checkpoint), qm, cfg.distill_weight, cfg.distill_features)
                 if cfg.distill else None)
    return train_detector(qm, train, tc, collate, quiet=cfg.quiet, description="qat", state_path=state_path,
                          resume=resume, step_hooks=hooks, distiller=distiller)


def save_quantized(qm: nn.Module, path: str | Path, stage: str, source: ModelSource | None = None) -> Path:
    """Save ``qm`` with its model source in the metadata, so :func:`load_quantized` needs only ``path``.

    ``source`` defaults to what ``qm`` is (the demo detector or an ultralytics model); pass it for other models.
    """
    source = source or infer_source(qm)
    metadata = {"stage": stage, "model": source.record(qm)}
    if source.kind == DEMO:
        metadata["detector_config"] = config_dict(qm)
    return save(qm, path, metadata=metadata)


def load_quantized(path: str | Path) -> nn.Module:
    return load(factory_of(path), path).eval()
