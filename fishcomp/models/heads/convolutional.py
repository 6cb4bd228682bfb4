"""Heads that keep the spatial map: global pooling, fully convolutional, inception, residual.

The fully convolutional and inception heads end in a conv to one map per class followed by global
average pooling, so they work for any input size and their class maps are heatmaps of where the
model sees each class (returned as `heatmaps`).
"""

from __future__ import annotations

import torch
from torch import nn

from fishcomp.config import (
    FcnHeadConfig,
    GapHeadConfig,
    InceptionHeadConfig,
    ResblockHeadConfig,
)
from fishcomp.models.heads.registry import register_head


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def map_input_norm(channels: int) -> nn.BatchNorm2d:
    """Normalisation of the cached map a head reads: batch statistics, no learnable scale or shift.

    Why not learnable: the convolution after it can take any per-channel scale into its weights,
    and a learnable one needs the gradient with respect to the map, the backward of that first
    convolution over all 1280 input channels, which nothing else needs: it was most of a training
    step (docs/results.md, "Map heads: where their time goes")."""
    return nn.BatchNorm2d(channels, affine=False)


def _input_layers(channels: int, reduce: int | None) -> tuple[list[nn.Module], int]:
    """The map's normalisation, then (with `reduce`) a 1x1 conv to fewer channels."""
    layers: list[nn.Module] = [map_input_norm(channels)]
    if reduce is not None:
        layers.append(conv_bn_relu(channels, reduce, 1))
        channels = reduce
    return layers, channels


class _MapHead(nn.Module):
    """Shared plumbing: `body` makes a feature map; `forward_head` turns it into logits."""

    needs_size = False
    makes_heatmaps = False

    def forward_features(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x)

    def stem(self) -> list[nn.Module] | None:
        """The layers that read the map itself, the map's normalisation and the first convolution
        (`train.stem_epochs` freezes them); None where the first layer is not one convolution."""
        first = self.body[1] if len(self.body) > 1 else None
        if isinstance(first, nn.Sequential) and isinstance(first[0], nn.Conv2d):
            return [self.body[0], first[0]]
        return None

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.forward_head(self.forward_features(x))}


class _ClassMapHead(_MapHead):
    """Conv to one map per class -> dropout -> global average pooling (the lesson's FCN ending)."""

    makes_heatmaps = True

    def _finish(self, layers: list[nn.Module], channels: int, dropout: float, num_classes: int) -> None:
        """The body's layers (ending with `channels` maps), then dropout and the class-map conv."""
        self.body = nn.Sequential(*layers)
        self.num_features = channels
        self.drop = nn.Dropout(dropout)
        self._make_classifier(num_classes)

    def _make_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Conv2d(self.num_features, num_classes, 3, padding=1)

    def class_maps(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(features))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.class_maps(features).mean(dim=(2, 3))

    def reset_classifier(self, num_classes: int) -> None:
        self._make_classifier(num_classes)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        maps = self.class_maps(self.forward_features(x))
        return {"logits": maps.mean(dim=(2, 3)), "heatmaps": maps}


class GapHead(_MapHead):
    def __init__(self, config: GapHeadConfig, in_shape: tuple[int, ...], num_classes: int, **_):
        super().__init__()
        channels = in_shape[0]
        self.body = nn.Sequential(map_input_norm(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(config.dropout))
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes)


class FcnHead(_ClassMapHead):
    def __init__(self, config: FcnHeadConfig, in_shape: tuple[int, ...], num_classes: int, **_):
        super().__init__()
        layers, channels = _input_layers(in_shape[0], config.reduce)
        for _ in range(config.blocks):
            layers += [conv_bn_relu(channels, config.channels, 3), nn.MaxPool2d(2, ceil_mode=True)]
            channels = config.channels
        self._finish(layers, channels, config.dropout, num_classes)


class InceptionBlock(nn.Module):
    def __init__(self, in_channels: int, width: float):
        super().__init__()

        def w(n: int) -> int:
            return max(1, round(n * width))

        self.branch1 = conv_bn_relu(in_channels, w(32), 1)
        self.branch5 = nn.Sequential(conv_bn_relu(in_channels, w(24), 1), conv_bn_relu(w(24), w(32), 5))
        self.branch3 = nn.Sequential(
            conv_bn_relu(in_channels, w(32), 1), conv_bn_relu(w(32), w(48), 3), conv_bn_relu(w(48), w(48), 3)
        )
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), conv_bn_relu(in_channels, w(16), 1))
        self.out_channels = w(32) + w(32) + w(48) + w(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Concatenated, not added: each branch keeps its own channels.
        return torch.cat([self.branch1(x), self.branch5(x), self.branch3(x), self.branch_pool(x)], dim=1)


class InceptionHead(_ClassMapHead):
    def __init__(self, config: InceptionHeadConfig, in_shape: tuple[int, ...], num_classes: int, **_):
        super().__init__()
        layers, channels = _input_layers(in_shape[0], config.reduce)
        for _ in range(config.blocks):
            block = InceptionBlock(channels, config.width)
            layers.append(block)
            channels = block.out_channels
        self._finish(layers, channels, config.dropout, num_classes)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(channels, channels, 3),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The identity shortcut: the block only has to learn the residual.
        return torch.relu(x + self.convs(x))


class ResblockHead(_MapHead):
    def __init__(self, config: ResblockHeadConfig, in_shape: tuple[int, ...], num_classes: int, **_):
        super().__init__()
        self.body = nn.Sequential(
            map_input_norm(in_shape[0]),
            conv_bn_relu(in_shape[0], config.channels, 1),
            *[ResidualBlock(config.channels) for _ in range(config.blocks)],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(config.dropout),
        )
        self.num_features = config.channels
        self.classifier = nn.Linear(config.channels, num_classes)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes)


register_head("gap")(GapHead)
register_head("fcn")(FcnHead)
register_head("inception")(InceptionHead)
register_head("resblock")(ResblockHead)
