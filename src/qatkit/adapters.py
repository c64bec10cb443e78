"""Entry-point adapters: the part of a model family's forward that should be quantized, as an ``nn.Module``.

No model code is edited; an adapter only chooses what ``forward`` to run. torchvision's detection models run an
image transform (resize/normalise) before and box decoding + NMS after the network, with data-dependent shapes:
those never get quantizers (post-processing stays float), so qatkit quantizes the network between them.
Ultralytics and timm models need no adapter: their ``forward`` is the network (the head decode after the last
trainable layer stays float by recipe, ``keep_head_decode_float``).
"""
from __future__ import annotations

import torch
from torch import nn


class DetectorCore(nn.Module):
    """``backbone`` + ``head`` of a torchvision detector (SSD, SSDlite, RetinaNet, FCOS).

    ``forward(images)`` returns the head's raw outputs (a dict of tensors, e.g. ``cls_logits``/``bbox_regression``)
    for already transformed images; the detector's own transform and ``postprocess_detections`` stay float and
    outside. The submodules are the detector's own objects, so training the core trains the detector.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        for part in ("backbone", "head"):
            if not isinstance(getattr(detector, part, None), nn.Module):
                raise TypeError(f"{type(detector).__name__} has no '{part}' module: DetectorCore wraps torchvision "
                                "detectors with .backbone and .head (SSD, SSDlite, RetinaNet, FCOS)")
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        features = list(features.values()) if isinstance(features, dict) else [features]
        return self.head(features)
