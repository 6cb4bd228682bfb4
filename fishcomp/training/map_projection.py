"""A fitted channel reduction of cached feature maps (`train.map_channels`): the maps' first k
principal components over their pixels, whitened, computed once per run before any fold trains.

Why: a head on a 360x640 map of EfficientNet sees 1280 channels at 12x20. Its first convolution
on them is most of a training step, every step of every epoch of every fold (docs/results.md,
"Map heads: where their time goes"). Projected once onto k channels with unit
variance, the maps are k/1280 of the size (held in memory like any map a head trains on:
`ResidentMaps`) and the head's first convolution about 1280/k times cheaper.

The projection is fitted on the train images' maps without their labels (no label reaches the
validation folds through it), and it travels inside each fold's checkpoint as a frozen 1x1
convolution in front of the head, so `predict` and `heatmap` feed the head raw maps as before.
"""

from __future__ import annotations

import numpy as np

from fishcomp.errors import FishcompError

# Pixels (map positions) sampled to fit the components: the covariance of 1280 channels is
# estimated to well under 1 % from this many, and fitting stays a second or two.
SAMPLED_PIXELS = 60_000


def fit_projection(maps: np.ndarray, rows: np.ndarray, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (C,), whitening components (C, k)) of the maps' pixels over `rows`."""
    count, depth, height, width = len(rows), *maps.shape[1:]
    if channels > depth:
        raise FishcompError(f"train.map_channels {channels} is more than the map's {depth} channels")
    rng = np.random.default_rng([seed, 41])
    images = np.sort(rng.choice(rows, size=min(count, max(1, SAMPLED_PIXELS // (height * width))), replace=False))
    pixels = np.asarray(maps[images], dtype=np.float32).transpose(0, 2, 3, 1).reshape(-1, depth)
    mean = pixels.mean(axis=0)
    centred = (pixels - mean).astype(np.float64)
    covariance = centred.T @ centred / max(len(centred) - 1, 1)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    top = np.argsort(values)[::-1][:channels]
    components = vectors[:, top] / np.sqrt(np.maximum(values[top], 1e-12))
    return mean.astype(np.float32), components.astype(np.float32)


def project(maps: np.ndarray, mean: np.ndarray, components: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(N, C, h, w) maps (memory-mapped float16 as cached) -> (N, k, h, w) float32 in memory,
    `chunk` images at a time so memory holds no more than the result and one chunk."""
    count, _, height, width = maps.shape
    out = np.empty((count, components.shape[1], height, width), dtype=np.float32)
    for start in range(0, count, chunk):
        block = np.asarray(maps[start : start + chunk], dtype=np.float32)
        pixels = block.transpose(0, 2, 3, 1) - mean
        out[start : start + chunk] = (pixels @ components).transpose(0, 3, 1, 2)
    return out


def projected_head(head, mean: np.ndarray, components: np.ndarray):
    """`head` behind the projection as a frozen 1x1 convolution: a module that reads raw maps."""
    import torch
    from torch import nn

    class ProjectedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = nn.Conv2d(components.shape[0], components.shape[1], 1)
            self.projection.requires_grad_(False)
            weight = torch.from_numpy(components.T.copy()).view(components.shape[1], components.shape[0], 1, 1)
            with torch.no_grad():
                self.projection.weight.copy_(weight)
                self.projection.bias.copy_(-torch.from_numpy(mean @ components))
            self.head = head
            self.needs_size = getattr(head, "needs_size", False)

        def forward(self, x, size=None):
            return self.head(self.projection(x), size=size)

    return ProjectedHead()
