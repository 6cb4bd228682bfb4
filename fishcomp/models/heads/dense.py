"""The lesson's dense head: BN -> dropout p/4 -> [Dense -> ReLU -> BN -> dropout] x 2 -> Dense(C).

On the spatial map (`input: map`) it first max-pools 2x2 and flattens, as the lesson did on VGG's
conv output; on the pooled vector it starts at the BN.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fishcomp.config import DenseHeadConfig
from fishcomp.models.heads import register_head


class DenseHead(nn.Module):
    def __init__(self, config: DenseHeadConfig, in_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        p = config.dropout
        self.uses_map = config.input == "map"
        if self.uses_map:
            channels, height, width = in_shape
            # ceil_mode keeps odd-sized maps (e.g. 12x20 from 360x640) whole.
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
            flat = channels * math.ceil(height / 2) * math.ceil(width / 2)
        else:
            self.pool = nn.Identity()
            flat = in_shape[0]
        self.trunk = nn.Sequential(
            nn.Flatten(),
            nn.BatchNorm1d(flat),
            nn.Dropout(p / 4),
            nn.Linear(flat, config.hidden),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(config.hidden),
            nn.Dropout(p),
            nn.Linear(config.hidden, config.hidden),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(config.hidden),
            nn.Dropout(p / 2),
        )
        self.num_features = config.hidden
        self.classifier = nn.Linear(config.hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.pool(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.forward_head(self.forward_features(x))}


@register_head("dense")
def create_dense(config: DenseHeadConfig, in_shape: tuple[int, ...], num_classes: int) -> DenseHead:
    return DenseHead(config, in_shape, num_classes)
