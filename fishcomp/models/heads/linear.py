"""The linear probe as a head: (pooling of the map,) standardisation, then one linear layer.
Fitted by `fishcomp.training.linear` (L-BFGS on scikit-learn's objective), but a plain module
once fitted, so its fold checkpoints load, predict and join ensembles like any head's."""

from __future__ import annotations

import torch
from torch import nn

from fishcomp.config import LinearHeadConfig
from fishcomp.models.heads.registry import register_head
from fishcomp.models.pooling import pool_map


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
