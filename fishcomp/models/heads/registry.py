"""The head registry: `register_head` (as timm's `register_model`), `create_head`, `list_heads`."""

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


def head_needs_size(config) -> bool:
    """Whether a head config's head also reads the image-size one-hot, without building the head."""
    return getattr(_REGISTRY[config.kind], "needs_size", False)


def list_heatmap_heads() -> list[str]:
    """Kinds whose `forward` returns per-class heatmaps (known from the class, nothing is built)."""
    return [kind for kind in list_heads() if getattr(_REGISTRY[kind], "makes_heatmaps", False)]


def create_head(config, in_shape: tuple[int, ...], num_classes: int, num_sizes: int = 1) -> nn.Module:
    """Build the head named by `config.kind` for features of `in_shape` (without the batch axis).

    `num_sizes`: slots of the image-size one-hot, for heads with `needs_size`.
    """
    head = _REGISTRY[config.kind](config, in_shape, num_classes, num_sizes=num_sizes)
    if head_uses_map(config):
        import torch

        # The layout of the map batches (training.feature_sets.as_input): weights and activations
        # in one layout, or every convolution converts them on each call.
        head = head.to(memory_format=torch.channels_last)
    return head

