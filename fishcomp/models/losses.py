"""Losses and the box/heatmap scores of the multi-output heads."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def head_loss(outputs: dict, labels: torch.Tensor, boxes: torch.Tensor | None, head_config, criterion) -> torch.Tensor:
    """Cross-entropy, plus `box_weight * box_loss` for heads that predict a box."""
    loss = criterion(outputs["logits"], labels)
    if "box" not in outputs or boxes is None or head_config.box_weight == 0:
        return loss
    if head_config.missing_box == "zero":
        target, have = torch.nan_to_num(boxes, nan=0.0), torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    else:
        target, have = boxes, ~torch.isnan(boxes).any(dim=1)
    if not have.any():
        return loss
    box_fn = F.mse_loss if head_config.box_loss == "mse" else F.smooth_l1_loss
    return loss + head_config.box_weight * box_fn(outputs["box"][have], target[have])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired (x, y, w, h) boxes, row by row."""
    ax1, ay1, bx1, by1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def heatmap_peaks(maps: np.ndarray) -> np.ndarray:
    """(N, h, w) maps -> (N, 2) peak positions (x, y) as fractions of the image (cell centres)."""
    n, h, w = maps.shape
    flat = maps.reshape(n, -1).argmax(axis=1)
    return np.stack([(flat % w + 0.5) / w, (flat // w + 0.5) / h], axis=1)


def pointing_hits(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each heatmap's peak lies inside its (x, y, w, h) box (fractions of the image)."""
    peaks = heatmap_peaks(maps)
    return (
        (peaks[:, 0] >= boxes[:, 0]) & (peaks[:, 0] <= boxes[:, 0] + boxes[:, 2])
        & (peaks[:, 1] >= boxes[:, 1]) & (peaks[:, 1] <= boxes[:, 1] + boxes[:, 3])
    )
