"""Float decode and NMS for the demo detector's raw head maps.

Kept outside the model on purpose: the exported INT8 graph ends at the head convs and both the PyTorch and
the ONNX Runtime paths share this exact decode, so any mAP difference comes from the network, not decode.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .detector import STRIDES


def make_grid(h: int, w: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """Cell centres in input pixels, shape [h*w, 2] as (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (torch.stack((xs, ys), -1).reshape(-1, 2).float() + 0.5) * stride


def box_distances(raw: torch.Tensor, stride: int) -> torch.Tensor:
    """Raw box logits [.., 4] -> left/top/right/bottom distances in pixels (softplus keeps them positive)."""
    return F.softplus(raw) * stride


def flatten_levels(outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the per-level maps: returns (box_raw [B,A,4], cls_raw [B,A,C], centres [A,2], strides [A])."""
    if len(outputs) != 2 * len(STRIDES):
        raise ValueError(f"expected {2 * len(STRIDES)} head maps (box, cls per level), got {len(outputs)}")
    boxes, clss, centres, strides = [], [], [], []
    for level, stride in enumerate(STRIDES):
        box, cls = outputs[2 * level], outputs[2 * level + 1]
        b, _, h, w = box.shape
        boxes.append(box.flatten(2).transpose(1, 2))
        clss.append(cls.flatten(2).transpose(1, 2))
        centres.append(make_grid(h, w, stride, box.device))
        strides.append(torch.full((h * w,), float(stride), device=box.device))
    return torch.cat(boxes, 1), torch.cat(clss, 1), torch.cat(centres), torch.cat(strides)


def decode_boxes(box_raw: torch.Tensor, centres: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Distances from each cell centre -> xyxy boxes in input pixels."""
    d = F.softplus(box_raw) * strides[:, None]
    return torch.cat((centres - d[..., :2], centres + d[..., 2:]), -1)


@torch.no_grad()
def postprocess(
    outputs: Sequence[torch.Tensor],
    *,
    score_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_detections: int = 100,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Raw head maps -> per image (boxes xyxy, scores, labels) after class-aware NMS, all in float32."""
    outputs = [o.float() for o in outputs]
    box_raw, cls_raw, centres, strides = flatten_levels(outputs)
    boxes = decode_boxes(box_raw, centres, strides)
    scores = cls_raw.sigmoid()
    results = []
    for b in range(boxes.shape[0]):
        cand, label = (scores[b] > score_threshold).nonzero(as_tuple=True)
        s = scores[b][cand, label]
        if s.numel() > 10 * max_detections:
            s, top = s.topk(10 * max_detections)
            cand, label = cand[top], label[top]
        bx = boxes[b][cand]
        keep = batched_nms(bx, s, label, iou_threshold)[:max_detections]
        results.append((bx[keep], s[keep], label[keep]))
    return results
