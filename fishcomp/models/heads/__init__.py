"""Heads trained on cached backbone features, in a registry like timm's models.

Every head has the same small interface:
- `forward_features(x)`: the trunk, up to the last hidden representation;
- `forward_head(h)`: the classifier, giving logits;
- `forward(x)`: a dict with `logits` (and whatever else the head predicts, e.g. `box`);
- `num_features`: width of the representation `forward_head` reads;
- `reset_classifier(num_classes)`: a fresh classifier for another class count;
- `uses_map`: whether it reads the spatial feature map (True) or the pooled vector (False);
- `needs_size`: whether `forward(x, size=...)` needs the image-size one-hot (the leakage input);
- `makes_heatmaps`: whether `forward` also returns `heatmaps`, one spatial map per class.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_head(kind: str):
    def decorator(factory):
        _REGISTRY[kind] = factory
        return factory

    return decorator


def list_heads() -> list[str]:
    return sorted(_REGISTRY)


def head_uses_map(config) -> bool:
    """Whether a head config needs the spatial map, without building the head."""
    return getattr(config, "input", "map") == "map"


def list_heatmap_heads() -> list[str]:
    """Kinds whose `forward` returns per-class heatmaps (known from the class, nothing is built)."""
    return [kind for kind in list_heads() if getattr(_REGISTRY[kind], "makes_heatmaps", False)]


def create_head(config, in_shape: tuple[int, ...], num_classes: int, num_sizes: int = 1) -> nn.Module:
    """Build the head named by `config.kind` for features of `in_shape` (without the batch axis).

    `num_sizes`: slots of the image-size one-hot, for heads with `needs_size`.
    """
    return _REGISTRY[config.kind](config, in_shape, num_classes, num_sizes=num_sizes)


# Importing the families registers them.
from fishcomp.models.heads import convolutional, dense  # noqa: E402,F401
