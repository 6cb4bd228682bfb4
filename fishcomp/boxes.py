"""Geometry of (x, y, w, h) boxes held in NumPy arrays, broadcast over any leading axes.

One overlap for every reader: the box sources' scores (IoU against the annotations), the crops'
consensus of the fold models' boxes, and the further crops' labels (how much of a fish a crop
holds). Boxes may be in fractions of the image or in pixels, so long as both sides share units; a
NaN box (no prediction, no annotation) overlaps nothing.
"""

from __future__ import annotations

import numpy as np


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Area of overlap of (..., 4) boxes, broadcast; NaN where either box is NaN."""
    wide = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    tall = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(wide, 0, None) * np.clip(tall, 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of (..., 4) boxes, broadcast; 0 where either is NaN or both are
    empty."""
    inter = intersection(a, b)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.where(union > 0, inter / union, 0.0))


def nearest_fish_iou(boxes: np.ndarray, every_fish: np.ndarray) -> np.ndarray:
    """Each (N, 4) box's IoU with the nearest of its photo's fish ((N, fish, 4), NaN rows where a
    photo has fewer): a box on any fish of the photo has found one."""
    return box_iou(boxes[:, None], every_fish).max(axis=1, initial=0.0)


def covered(rectangles: np.ndarray, fish: np.ndarray) -> np.ndarray:
    """(..., ) the largest share of any fish's box (..., fish, 4) inside each rectangle (..., 4);
    NaN where the rectangle is NaN, 0 where there is no fish."""
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(intersection(rectangles[..., None, :], fish) / (fish[..., 2] * fish[..., 3]))
    return np.where(np.isnan(rectangles).any(axis=-1), np.nan, share.max(axis=-1, initial=0.0))
