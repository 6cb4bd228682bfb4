"""The linear probe as a head: (pooling of the map,) standardisation, then one linear layer.
Fitted by `fishcomp.training.linear` (L-BFGS on scikit-learn's objective), but a plain module
once fitted, so its fold checkpoints load, predict and join ensembles like any head's."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fishcomp.config import LinearHeadConfig
from fishcomp.models.heads.registry import register_head


# GeM's exponent: the GeM paper's starting value, fixed rather than learnt because the probe is
# fitted in closed form on pooled vectors (p = 1 is the average, p -> infinity the maximum).
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


class LinearProbe(nn.Module):
    needs_size = False

    def __init__(self, config: LinearHeadConfig, in_shape: tuple[int, ...], num_classes: int, **_):
        super().__init__()
        # On the map (`pool: max | gem`) the head pools it itself: (C, H, W) in, C features.
        self.pool = config.pool
        dim = in_shape[0]
        self.num_features = dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.classifier = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        if self.pool is not None:
            x = pool_map(x, self.pool)
        return (x - self.mean) / self.scale

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.forward_head(self.forward_features(x))}


register_head("linear")(LinearProbe)
