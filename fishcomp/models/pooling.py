"""Pooling a backbone's feature map into one vector per image, other than the backbone's own
average: the linear probe (`head.pool`) and the crop embedding (`crops.pool`) share it."""

from __future__ import annotations

import numpy as np
import torch

# GeM's exponent: the GeM paper's starting value, fixed rather than learnt because both users pool
# frozen features before anything is fitted (p = 1 is the average, p -> infinity the maximum).
GEM_POWER = 3.0


def pool_map(maps: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, H, W) maps -> (N, C) vectors, in float32: each channel's maximum or generalised mean."""
    cells = maps.float().flatten(2)
    if pool == "max":
        return cells.amax(dim=2)
    # The backbone's last activation is a ReLU6, so cells are >= 0; the floor keeps the root's
    # gradient and value finite on an all-zero channel.
    return cells.clamp_min(1e-6).pow(GEM_POWER).mean(dim=2).pow(1 / GEM_POWER)


def pooled_rows(array, pool: str, chunk: int = 64) -> np.ndarray:
    """A cached (N, C, H, W) map array (memory-mapped float16) pooled a chunk at a time, so the
    whole map is never held in float32: (N, C) float32."""
    out = np.empty(array.shape[:2], dtype=np.float32)
    for start in range(0, len(array), chunk):
        out[start : start + chunk] = pool_map(torch.from_numpy(np.array(array[start : start + chunk])), pool).numpy()
    return out
