"""The demo detector: a small YOLOv8-style network (Conv-BN-SiLU, C2f, SPPF, PAN neck, decoupled head).

It is written as ordinary PyTorch, with functional ``torch.cat``, ``chunk``, residual ``+`` and
``F.interpolate``, exactly the constructs that make hand-written QAT painful: qatkit must quantize it
without any change to this file. The forward returns the raw head maps; decoding and NMS live in
:mod:`qatkit.apps.models.postprocess` and stay in float, as deployed detectors do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16, 32)


class Conv(nn.Module):
    """Conv2d + BatchNorm + SiLU, the YOLO building block."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 convs with a residual add (the add is a plain ``+``)."""

    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with two branches: ``chunk`` the features, run bottlenecks, ``torch.cat`` everything."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools whose outputs are concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Head(nn.Module):
    """Decoupled head for one level: a box branch (4 distances) and a class branch (nc logits)."""

    def __init__(self, c: int, nc: int, hidden: int) -> None:
        super().__init__()
        self.box = nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3), nn.Conv2d(hidden, 4, 1))
        self.cls = nn.Sequential(Conv(c, hidden, 3), Conv(hidden, hidden, 3), nn.Conv2d(hidden, nc, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box(x), self.cls(x)


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture hyper-parameters; stored in checkpoints so a model can be rebuilt exactly."""

    num_classes: int = 3
    widths: tuple[int, ...] = (16, 32, 64, 128, 192)
    depths: tuple[int, ...] = (1, 2, 2, 1)
    head_width: int = 64
    img_size: int = 160


class TinyYolo(nn.Module):
    """YOLOv8-style detector; ``forward`` returns ``[box_P3, cls_P3, box_P4, cls_P4, box_P5, cls_P5]``."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or DetectorConfig()
        w, d = cfg.widths, cfg.depths
        self.stem = Conv(3, w[0], 3, 2)
        self.stage1 = nn.Sequential(Conv(w[0], w[1], 3, 2), C2f(w[1], w[1], d[0]))
        self.stage2 = nn.Sequential(Conv(w[1], w[2], 3, 2), C2f(w[2], w[2], d[1]))  # P3, stride 8
        self.stage3 = nn.Sequential(Conv(w[2], w[3], 3, 2), C2f(w[3], w[3], d[2]))  # P4, stride 16
        self.stage4 = nn.Sequential(Conv(w[3], w[4], 3, 2), C2f(w[4], w[4], d[3]), SPPF(w[4], w[4]))  # P5
        self.up4 = C2f(w[4] + w[3], w[3], 1, shortcut=False)
        self.up3 = C2f(w[3] + w[2], w[2], 1, shortcut=False)
        self.down3 = Conv(w[2], w[2], 3, 2)
        self.pan4 = C2f(w[2] + w[3], w[3], 1, shortcut=False)
        self.down4 = Conv(w[3], w[3], 3, 2)
        self.pan5 = C2f(w[3] + w[4], w[4], 1, shortcut=False)
        self.heads = nn.ModuleList(Head(c, cfg.num_classes, cfg.head_width) for c in (w[2], w[3], w[4]))
        self._init_head_bias()

    def _init_head_bias(self) -> None:
        """Start with low class scores and ~2-stride boxes, as YOLO does, so early training is stable."""
        for head in self.heads:
            nn.init.constant_(head.box[-1].bias, 1.5)
            nn.init.constant_(head.cls[-1].bias, -4.6)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        n4 = self.up4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        n3 = self.up3(torch.cat([F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3], 1))
        n4 = self.pan4(torch.cat([self.down3(n3), n4], 1))
        n5 = self.pan5(torch.cat([self.down4(n4), p5], 1))
        outs: list[torch.Tensor] = []
        for head, feat in zip(self.heads, (n3, n4, n5)):
            outs.extend(head(feat))
        return outs


def build_detector(config: DetectorConfig | dict | None = None) -> TinyYolo:
    """Factory used by checkpoints and the CLI (a dict is what a checkpoint stores)."""
    if isinstance(config, dict):
        config = DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return TinyYolo(config)


def config_dict(model: TinyYolo) -> dict:
    return asdict(model.config)
