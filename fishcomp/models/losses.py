"""Losses and the box/heatmap scores of the multi-output heads."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def split_geometry(targets, head_config) -> tuple:
    """`geometry_targets`' columns read back (NumPy or torch): the largest box (N, 4), head/tail
    points (N, 4) or None, and every annotated fish's box (N, fish, 4), the largest first, NaN
    rows where a photo has fewer."""
    points = targets[:, 4:8] if getattr(head_config, "points_weight", None) and targets.shape[1] >= 8 else None
    largest, others = targets[:, :4], targets[:, 4 if points is None else 8:]
    rows = [largest[:, None], others.reshape(len(targets), -1, 4)]
    every_fish = torch.cat(rows, dim=1) if isinstance(targets, torch.Tensor) else np.concatenate(rows, axis=1)
    return largest, points, every_fish


def head_loss(outputs: dict, labels: torch.Tensor, boxes: torch.Tensor | None, head_config, criterion) -> torch.Tensor:
    """Cross-entropy, plus `box_weight * box_loss` for heads that predict a box, plus
    `points_weight * MSE` of head and tail for those that predict them (`split_geometry`)."""
    loss = criterion(outputs["logits"], labels)
    if boxes is None:
        return loss
    box_targets, points, every_fish = split_geometry(boxes, head_config)
    if "box" in outputs and head_config.box_weight:
        if head_config.missing_box == "zero":
            target, have = torch.nan_to_num(box_targets, nan=0.0), torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
        else:
            target, have = box_targets, ~torch.isnan(box_targets).any(dim=1)
        box_fn = F.mse_loss if head_config.box_loss == "mse" else F.smooth_l1_loss
        if "box_cells" in outputs:
            # A grid has no "zero box" to point at: photos whose fish are all unknown add nothing.
            have = ~torch.isnan(every_fish).any(dim=2).all(dim=1)
            if have.any():
                loss = loss + grid_box_loss(outputs["box_cells"][have], outputs["box_geometry"][have], every_fish[have], head_config.box_weight, box_fn)
        elif have.any():
            loss = loss + head_config.box_weight * box_fn(outputs["box"][have], target[have])
    if "points" in outputs and points is not None:
        have = ~torch.isnan(points).any(dim=1)
        if have.any():
            loss = loss + head_config.points_weight * F.mse_loss(outputs["points"][have], points[have])
    return loss


def grid_box_loss(cells: torch.Tensor, geometry: torch.Tensor, boxes: torch.Tensor, weight: float, box_fn) -> torch.Tensor:
    """Cross-entropy over the cells for those holding a fish's centre, plus `weight` times the
    regression, at each such cell, of the centre's offset in it and that fish's box size.
    `boxes` (N, fish, 4), NaN rows for none: with one fish a photo's target is its cell; with
    several, the target spreads equally over their cells."""
    n, height, width = cells.shape
    if boxes.ndim == 2:
        boxes = boxes[:, None]
    have = ~torch.isnan(boxes).any(dim=2)  # (N, fish)
    boxes = torch.nan_to_num(boxes, nan=0.0)
    centre_x, centre_y = boxes[..., 0] + boxes[..., 2] / 2, boxes[..., 1] + boxes[..., 3] / 2
    column = (centre_x * width).floor().clamp(0, width - 1)
    row = (centre_y * height).floor().clamp(0, height - 1)
    target_cell = (row * width + column).long()  # (N, fish)
    chosen = geometry.flatten(2).gather(2, target_cell[:, None].expand(n, 4, -1)).transpose(1, 2)  # (N, fish, 4)
    truth = torch.stack([(centre_x * width - column).clamp(0, 1), (centre_y * height - row).clamp(0, 1), boxes[..., 2], boxes[..., 3]], dim=2)
    if boxes.shape[1] == 1 and bool(have.all()):
        pointing = F.cross_entropy(cells.flatten(1), target_cell[:, 0])
    else:  # in float32: the shares are probabilities, and cells may come in bf16
        share = have.float() / have.sum(dim=1, keepdim=True).clamp(min=1).float()
        target = torch.zeros(n, height * width, device=cells.device).scatter_add_(1, target_cell, share)
        pointing = F.cross_entropy(cells.flatten(1).float(), target)
    return pointing + weight * box_fn(chosen[have], truth[have])


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


# A class map is coarse (an fcn's is 3x5 cells on a 360x640 input), so it is upsampled this many
# times per axis before thresholding: the box edges then fall between cell centres where the
# activation crosses the threshold, instead of on whole cells.
CLASS_MAP_UPSAMPLE = 8
# Half the peak (above the map's floor) outlines the region: the CAM paper's 20 % suits ImageNet
# objects that fill the frame; a fish covers a few per cent of a boat-camera photo.
CLASS_MAP_THRESHOLD = 0.5


def class_map_boxes(heatmaps: np.ndarray, probs: np.ndarray, background: int | None = None) -> np.ndarray:
    """(N, classes, h, w) class maps -> (N, 4) boxes (x, y, w, h, fractions of the image): around
    the peak of the most probable foreground class's map (classes other than `background`, e.g.
    NoF, whose map marks empty deck), the bounding box of the connected region, containing the
    peak, where the upsampled map is above `CLASS_MAP_THRESHOLD` of the way from its floor to its
    peak. A flat map gives the whole image."""
    from scipy import ndimage

    scores = np.array(probs, dtype=np.float64, copy=True)
    if background is not None and scores.shape[1] > 1:
        scores[:, background] = -np.inf
    chosen = heatmaps[np.arange(len(scores)), scores.argmax(axis=1)].astype(np.float32)
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (len(chosen), 1))
    for start in range(0, len(chosen), 256):  # upsampled in chunks: 12k stage-2 maps would not fit at once
        maps = F.interpolate(torch.from_numpy(chosen[start:start + 256])[:, None], scale_factor=CLASS_MAP_UPSAMPLE, mode="bilinear", align_corners=False)[:, 0].numpy()
        height, width = maps.shape[1:]
        for i, cam in enumerate(maps, start):
            floor, peak = cam.min(), cam.max()
            if not np.isfinite(peak) or peak - floor <= 0:
                continue
            regions, _ = ndimage.label(cam >= floor + CLASS_MAP_THRESHOLD * (peak - floor), structure=np.ones((3, 3)))
            row, column = np.unravel_index(cam.argmax(), cam.shape)
            rows, columns = np.nonzero(regions == regions[row, column])
            boxes[i] = [columns.min() / width, rows.min() / height, (columns.max() + 1 - columns.min()) / width, (rows.max() + 1 - rows.min()) / height]
    return boxes
