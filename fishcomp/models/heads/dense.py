"""The lesson's dense family: a shared trunk (BN -> dropout p/4 -> [Dense -> ReLU -> BN -> dropout] x 2)
with three tops: the 8-way classifier (`dense`), plus the image-size one-hot (`leakage`), plus a box
regressor (`bbox`). Any of the three can sit on top of a fitted linear probe's logits (`base`).

On the spatial map (`input: map`) the trunk first max-pools 2x2 and flattens, as the lesson did on
VGG's conv output (optionally after a 1x1 conv that reduces the channels, `reduce`); on the pooled
vector it starts at the BN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fishcomp.config import BboxHeadConfig, DenseHeadConfig, LeakageHeadConfig
from fishcomp.models.heads.convolutional import map_input_norm
from fishcomp.models.heads.registry import register_head


def _start_at_zero(layer: nn.Linear) -> nn.Linear:
    """A layer whose output starts at exactly zero: added to a fitted probe's logits (`base`), the
    head starts at the probe's predictions."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FlooredBatchNorm1d(nn.BatchNorm1d):
    """Batch norm whose evaluation-time variances are at least (`floor` x the median channel's
    running deviation) squared; training uses the batch's statistics as any batch norm does."""

    def __init__(self, features: int, floor: float):
        super().__init__(features)
        self.floor = floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_var is None:
            return super().forward(x)
        variance = self.running_var.clamp_min((self.floor * self.running_var.sqrt().median()) ** 2)
        return nn.functional.batch_norm(x, self.running_mean, variance, self.weight, self.bias, False, 0.0, self.eps)


class DenseTrunk(nn.Sequential):
    def __init__(self, in_shape: tuple[int, ...], input_kind: str, dropout: float, hidden: int, reduce: int | None = None,
                 input_floor: float | None = None):
        if input_kind == "map":
            channels, height, width = in_shape
            # ceil_mode keeps odd-sized maps (e.g. 12x20 from 360x640) whole.
            pool: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)]
            if reduce is not None:
                pool = [map_input_norm(channels), nn.Conv2d(channels, reduce, 1, bias=False), nn.BatchNorm2d(reduce), nn.ReLU(inplace=True), *pool]
                channels = reduce
            flat = channels * math.ceil(height / 2) * math.ceil(width / 2)
        else:
            pool, flat = [], in_shape[0]
        p = dropout
        super().__init__(
            *pool, nn.Flatten(), nn.BatchNorm1d(flat) if input_floor is None else FlooredBatchNorm1d(flat, input_floor), nn.Dropout(p / 4),
            nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden), nn.Dropout(p),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden), nn.Dropout(p / 2),
        )


class DenseHead(nn.Module):
    needs_size = False

    def __init__(self, config: DenseHeadConfig, in_shape: tuple[int, ...], num_classes: int, **_):
        super().__init__()
        # Only the dense head's own config has `input_floor`; the leakage and bbox heads share its trunk as it was.
        self.trunk = DenseTrunk(in_shape, config.input, config.dropout, config.hidden, config.reduce, getattr(config, "input_floor", None))
        self.num_features = config.hidden
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.base = None
        if getattr(config, "base", None) is not None:
            from fishcomp.models.heads.linear import LinearProbe

            # Fitted before training (fishcomp.training.folds) and frozen; the dense layers add to
            # its logits from zero, so training starts at the probe's predictions.
            self.base = LinearProbe(config.base, in_shape, num_classes).requires_grad_(False)
            self.num_features = config.hidden + in_shape[0]
            _start_at_zero(self.classifier)

    @property
    def classifier_inputs(self) -> int:
        return self.classifier.in_features

    def forward_features(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        if self.base is None:
            return self.trunk(x)
        # The trunk's features, then the probe's standardised input: what the two linear tops read.
        return torch.cat([self.trunk(x), self.base.forward_features(x)], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.base is None:
            return self.classifier(features)
        return self.classifier(features[:, : self.classifier_inputs]) + self.base.forward_head(features[:, self.classifier_inputs :])

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.classifier_inputs, num_classes)
        if self.base is not None:
            # Other classes: the fitted probe no longer applies; its layer starts at zero and learns.
            self.base.reset_classifier(num_classes)
            _start_at_zero(self.base.classifier)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.forward_head(self.forward_features(x, size))}


class LeakageHead(DenseHead):
    """Multi-input: the original image size (one-hot over the sizes seen in train, plus a slot for
    any unseen size) joins the image features right before the classifier."""

    needs_size = True

    def __init__(self, config: LeakageHeadConfig, in_shape: tuple[int, ...], num_classes: int, num_sizes: int = 1, **_):
        super().__init__(config, in_shape, num_classes)
        self.size_norm = nn.BatchNorm1d(num_sizes)
        self.num_features += num_sizes
        self.classifier = nn.Linear(config.hidden + num_sizes, num_classes)
        if self.base is not None:
            _start_at_zero(self.classifier)

    def forward_features(self, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
        if size is None:
            raise ValueError("the leakage head needs the image-size one-hot")
        # The classifier reads the trunk and the size; a probe underneath, its standardised input.
        parts = [self.trunk(x), self.size_norm(size)]
        if self.base is not None:
            parts.append(self.base.forward_features(x))
        return torch.cat(parts, dim=1)


def _logit(fractions: np.ndarray) -> torch.Tensor:
    """The sigmoid's input that gives these fractions (kept off 0 and 1, where it is infinite)."""
    return torch.logit(torch.as_tensor(fractions, dtype=torch.float32), eps=1e-3)


class GridLocator(nn.Module):
    """Finds one box on the spatial map: a logit per cell for holding the box centre, and per cell
    the centre's offset inside it and the box's width and height (fractions of the image)."""

    def __init__(self, channels: int, hidden: int = 128, normalised: bool = False):
        super().__init__()
        # A 1x1 reduction first keeps the 3x3 (which lets a cell see its neighbours) cheap.
        # `normalised`: it is given the map already normalised (by the head it shares it with).
        self.net = nn.Sequential(
            nn.Identity() if normalised else map_input_norm(channels), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.BatchNorm2d(hidden), nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 5, 1),
        )

    def start_at_size(self, width: float, height: float) -> None:
        """Start every cell's box size at (width, height), fractions of the image, instead of the
        sigmoid's 0.5 (`box_start`)."""
        with torch.no_grad():
            self.net[-1].bias[3:5] = _logit(np.array([width, height]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        cells, geometry = out[:, 0], torch.sigmoid(out[:, 1:])  # (N, h, w), (N, 4, h, w)
        return {"box": self.decode(cells, geometry), "box_cells": cells, "box_geometry": geometry}

    @staticmethod
    def mirrored_back(cells: torch.Tensor, geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A mirrored view's cell scores and geometry in the original photo's frame: columns
        reversed, and the centre's offset inside its cell measured from the other side."""
        cells, geometry = cells.flip(-1), geometry.flip(-1)  # flip returns a copy
        geometry[:, 0] = 1 - geometry[:, 0]
        return cells, geometry

    @staticmethod
    def cell_map(cells: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """(N, 5, h, w): each cell's probability of holding the box centre (a softmax over the
        image's cells), then its geometry: what `cell_boxes` reads, averaged over fold models."""
        n, height, width = cells.shape
        probability = torch.softmax(cells.float().flatten(1), dim=1).reshape(n, 1, height, width)
        return torch.cat([probability, geometry.float()], dim=1)

    @staticmethod
    def cell_boxes(cell_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, cells), boxes (N, cells, 4) x, y, w, h fractions clipped to the
        image): every cell's own box, as `decode` reads the best one's."""
        n, _, height, width = cell_map.shape
        flat = cell_map.reshape(n, 5, height * width)
        column, row = np.arange(height * width) % width, np.arange(height * width) // width
        centre_x, centre_y = (column + flat[:, 1]) / width, (row + flat[:, 2]) / height
        left, top = np.clip(centre_x - flat[:, 3] / 2, 0, 1), np.clip(centre_y - flat[:, 4] / 2, 0, 1)
        right, bottom = np.clip(centre_x + flat[:, 3] / 2, 0, 1), np.clip(centre_y + flat[:, 4] / 2, 0, 1)
        return flat[:, 0], np.stack([left, top, right - left, bottom - top], axis=2)

    @staticmethod
    def decode(cells: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """The box (x, y, w, h fractions) of each image's highest-scoring cell."""
        n, height, width = cells.shape
        best = cells.flatten(1).argmax(dim=1)
        chosen = geometry.flatten(2)[torch.arange(n, device=cells.device), :, best]  # (N, 4)
        centre_x = (best % width + chosen[:, 0]) / width
        centre_y = (best // width + chosen[:, 1]) / height
        # Clipped to the image, as the annotated boxes are.
        left, top = (centre_x - chosen[:, 2] / 2).clamp(0, 1), (centre_y - chosen[:, 3] / 2).clamp(0, 1)
        right, bottom = (centre_x + chosen[:, 2] / 2).clamp(0, 1), (centre_y + chosen[:, 3] / 2).clamp(0, 1)
        return torch.stack([left, top, right - left, bottom - top], dim=1)


class BboxHead(DenseHead):
    """Multi-output: the class logits and a box (x, y, w, h as fractions of the image)."""

    def __init__(self, config: BboxHeadConfig, in_shape: tuple[int, ...], num_classes: int, **_):
        super().__init__(config, in_shape, num_classes)
        # A sigmoid keeps predicted coordinates inside the image.
        self.box = nn.Sequential(nn.Linear(self.num_features, 4), nn.Sigmoid())
        # With a channel reduction the trunk starts by normalising the map, as the grid locator
        # would: the same statistics of the same batch, so it is done once for both (on a
        # 1280-channel map each normalisation was an eighth of a training step).
        self.box_start = config.box_start
        self.box_tta = config.box_tta
        self.shared_norm = config.box_from == "grid" and config.input == "map" and config.reduce is not None
        self.locator = GridLocator(in_shape[0], normalised=self.shared_norm) if config.box_from == "grid" else None
        # Head (x, y) and tail (x, y) of the fish, when asked for.
        self.points = nn.Sequential(nn.Linear(self.num_features, 4), nn.Sigmoid()) if config.points_weight else None

    def start_from_targets(self, boxes: np.ndarray) -> None:
        """With `box_start: median`, the box outputs start at the fold's training boxes' median
        ((N, 4+) fractions, NaN for none): the grid locator's size, the trunk's whole box."""
        have = ~np.isnan(boxes[:, :4]).any(axis=1)
        if self.box_start != "median" or not have.any():
            return
        median = np.median(boxes[have, :4], axis=0)
        if self.locator is not None:
            self.locator.start_at_size(float(median[2]), float(median[3]))
        else:
            with torch.no_grad():
                self.box[0].bias.copy_(_logit(median))

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.shared_norm:
            x = features = self.trunk[0](x)
            for layer in list(self.trunk)[1:]:
                features = layer(features)
        else:
            features = self.forward_features(x)
        outputs = {"logits": self.forward_head(features)}
        outputs.update(self.locator(x) if self.locator is not None else {"box": self.box(features)})
        if self.points is not None:
            outputs["points"] = self.points(features)
        return outputs


register_head("dense")(DenseHead)
register_head("leakage")(LeakageHead)
register_head("bbox")(BboxHead)
