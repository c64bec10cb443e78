"""Training loss for the demo detector: centre-sampling assignment, IoU-aware class targets, GIoU boxes.

The same loss serves float training and QAT fine-tuning, so QAT optimises exactly what float training did.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from .detector import STRIDES
from .postprocess import decode_boxes, flatten_levels

# An object goes to the level whose stride s satisfies  2s <= max side < 4s (clamped at both ends).
CENTRE_RADIUS = 2.5


def _level_of(max_side: torch.Tensor) -> torch.Tensor:
    level = torch.floor(torch.log2(max_side.clamp(min=1.0) / (2 * STRIDES[0])))
    return level.clamp(0, len(STRIDES) - 1).long()


def assign(
    centres: torch.Tensor, strides: torch.Tensor, gt_boxes: torch.Tensor
) -> torch.Tensor:
    """For each anchor cell, the index of its ground-truth box or -1.

    A cell is positive for a box when its centre lies inside the box, within ``CENTRE_RADIUS`` strides of the
    box centre, and on the box's level; the cell containing the box centre always is. Ties go to the smaller box.
    """
    a = centres.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((a,), -1, dtype=torch.long, device=centres.device)
    wh = gt_boxes[:, 2:] - gt_boxes[:, :2]
    ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    level_stride = torch.tensor(STRIDES, device=centres.device, dtype=torch.float32)[_level_of(wh.max(1).values)]
    on_level = strides[:, None] == level_stride[None, :]  # [A, G]
    inside = ((centres[:, None, :] > gt_boxes[None, :, :2]) & (centres[:, None, :] < gt_boxes[None, :, 2:])).all(-1)
    near = ((centres[:, None, :] - ctr[None]).abs() < CENTRE_RADIUS * strides[:, None, None]).all(-1)
    own_cell = ((centres[:, None, :] - ctr[None]).abs() <= strides[:, None, None] / 2).all(-1)
    pos = on_level & ((inside & near) | own_cell)
    area = (wh[:, 0] * wh[:, 1])[None].expand(a, -1)
    area = torch.where(pos, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(1)
    return torch.where(torch.isfinite(best_area), best, torch.full_like(best, -1))


def detection_loss(
    outputs: Sequence[torch.Tensor], targets: Sequence[dict], box_weight: float = 2.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of IoU-aware BCE on classes and GIoU on boxes, normalised by the number of positives."""
    box_raw, cls_raw, centres, strides = flatten_levels([o.float() for o in outputs])
    boxes = decode_boxes(box_raw, centres, strides)
    cls_target = torch.zeros_like(cls_raw)
    box_losses, n_pos = [], 0
    for b, target in enumerate(targets):
        gt = target["boxes"].to(boxes.device)
        idx = assign(centres, strides, gt)
        pos = idx >= 0
        if not pos.any():
            continue
        pred, matched = boxes[b][pos], gt[idx[pos]]
        iou = box_iou(pred.detach(), matched).diagonal().clamp(min=0.05)
        cls_target[b, pos, target["labels"].to(boxes.device)[idx[pos]]] = iou
        box_losses.append(generalized_box_iou_loss(pred, matched, reduction="sum"))
        n_pos += int(pos.sum())
    norm = max(n_pos, 1)
    cls_loss = F.binary_cross_entropy_with_logits(cls_raw, cls_target, reduction="sum") / norm
    box_loss = torch.stack(box_losses).sum() / norm if box_losses else boxes.sum() * 0.0
    total = cls_loss + box_weight * box_loss
    return total, {"cls": float(cls_loss.detach()), "box": float(box_loss.detach()), "pos": float(n_pos)}
