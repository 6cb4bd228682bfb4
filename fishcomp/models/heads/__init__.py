"""Heads trained on cached backbone features, in a registry like timm's models.

Every head has the same small interface:
- `forward_features(x)`: the trunk, up to the last hidden representation;
- `forward_head(h)`: the classifier, giving logits;
- `forward(x)`: a dict with `logits` (and whatever else the head predicts, e.g. `box`);
- `num_features`: width of the representation `forward_head` reads;
- `reset_classifier(num_classes)`: a fresh classifier for another class count;
- `needs_size`: whether `forward(x, size=...)` needs the image-size one-hot (the leakage input);
- `makes_heatmaps`: whether `forward` also returns `heatmaps`, one spatial map per class.
"""

# Importing the families registers them.
from fishcomp.models.heads import convolutional, dense, linear  # noqa: E402,F401
from fishcomp.models.heads.registry import (
    create_head,
    head_needs_size,
    head_uses_map,
    list_heads,
    list_heatmap_heads,
    register_head,
)

__all__ = ["create_head", "head_needs_size", "head_uses_map", "list_heads", "list_heatmap_heads", "register_head"]
