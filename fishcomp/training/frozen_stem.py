"""`train.stem_epochs`: a map head's first layers trained for that many epochs, then frozen.

The layers that read the 1280-channel map (its normalisation and the first convolution) are most
of a map head's training step: the convolution's forward and its weight gradient over every input
channel (docs/results.md, "Map heads: where their time goes"). Once frozen, their output for each
of the fold's maps is a fixed, ten-times-smaller tensor: it is computed once, held in memory, and
the remaining epochs train the layers above it at a fraction of the cost. The normalisation then
uses its running statistics, as it does at prediction time.
"""

from __future__ import annotations

import numpy as np

from fishcomp.context import autocast
from fishcomp.training.feature_sets import FeatureSet, ResidentMaps


def _passthrough(x, *_, **__):
    return x


class FrozenStem:
    """The stem layers of one fold's head (`head.stem()`), frozen by `freeze` and given back to
    the head, unchanged since, by `release`."""

    def __init__(self, layers, device, dtype, held_as):
        self.layers, self.device, self.dtype, self.held_as = layers, device, dtype, held_as
        self.frozen = False

    def bytes_needed(self, sets: dict[str, FeatureSet | None]) -> int:
        """What `freeze` would hold in memory for `sets`: one output per row and copy, the
        convolution's channels at the map's size (its padding keeps the size)."""
        import torch

        itemsize = torch.empty(0, dtype=self.held_as or torch.float32).element_size()
        per_map = self.layers[-1].out_channels * int(np.prod(next(iter(sets.values())).shape[1:])) * itemsize
        return sum(len(features) * features.copy_count * per_map for features in sets.values() if features is not None)

    def freeze(self, sets: dict[str, FeatureSet | None]) -> dict[str, FeatureSet | None]:
        """`sets` (train, validation, pseudo-labelled) as the stem's outputs; from now on the head
        passes its input straight to the layers above the stem."""
        for layer in self.layers:
            layer.eval()
        outputs = {name: None if features is None else self._outputs(features) for name, features in sets.items()}
        for layer in self.layers:
            # An instance attribute shadows the class's forward: the layer stays in the model (its
            # weights in every checkpoint) but lets its input through.
            layer.forward = _passthrough
        self.frozen = True
        return outputs

    def release(self) -> None:
        if self.frozen:
            for layer in self.layers:
                del layer.forward
            self.frozen = False

    def _outputs(self, features: FeatureSet) -> FeatureSet:
        """The stem's output for every row of `features` and each of its augmented copies, in the
        same positions (so batches, copies and boxes line up as before)."""
        import torch

        held = []
        for copy in range(features.copy_count):
            parts = []
            with torch.no_grad(), autocast(self.dtype, self.device):
                for start in range(0, len(features), 256):
                    positions = np.arange(start, min(start + 256, len(features)))
                    x, _, _ = features.batch(positions, self.device, copies=np.full(len(positions), copy))
                    for layer in self.layers:
                        x = layer(x)
                    parts.append(x.to(dtype=self.held_as or torch.float32).cpu())
            held.append(ResidentMaps.from_tensor(torch.cat(parts)))
        return FeatureSet(held[0], np.arange(len(features)), features.sizes, features.boxes, held[1:], features.copy_boxes)
