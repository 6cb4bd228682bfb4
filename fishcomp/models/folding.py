"""Batch norms folded into the convolutions before them, for a frozen backbone's float32 and bfloat16 passes.

A frozen backbone's batch norm is a fixed per-channel scale and shift, so it can live in the
convolution's weights and bias (`torch.nn.utils.fusion.fuse_conv_bn_weights`) instead of running
as an operation of its own, a pass over the whole activation: a profile of the crops stage spent
15 s of 100 in batch norm. Folded, a float32 pass computes the same features to float32 rounding,
faster (scripts/bench_folding.py).

Only blocks whose forward is known to apply the norm right after the convolution are folded:
timm's EfficientNet family (every backbone with offline weights). Any other backbone is left as it
is. A bf16 pass folded rounds differently from one unfolded (the folded weight once, instead of
the weight and then the norm's output), as close to float32 either way; fp16 passes are not folded
(fishcomp.features.folds_norms says which).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# Block class name -> (convolution, its norm) attribute pairs, in timm's EfficientNet blocks.
FOLDABLE = {
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
    "ConvBnAct": (("conv", "bn1"),),
    # The model itself: its stem and its head's 1x1 convolution.
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
}


class _AfterNorm(nn.Module):
    """What a timm BatchNormAct2d does after normalising (dropout, then its activation)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> bool:
    conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None:
        return False
    if norm.num_features != conv.out_channels or not norm.affine:
        return False
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    conv.weight, conv.bias = weight, bias
    setattr(parent, norm_name, _AfterNorm(norm))
    return True


def fold_batch_norms(model: nn.Module) -> int:
    """Folds, in place, every batch norm of a known block into its convolution; returns how many.
    The model must be in eval mode (its running statistics are what is folded)."""
    if model.training:
        raise ValueError("fold_batch_norms folds running statistics: call model.eval() first")
    folded = 0
    for module in list(model.modules()):
        for conv_name, norm_name in FOLDABLE.get(type(module).__name__, ()):
            folded += _fold_pair(module, conv_name, norm_name)
    return folded


def folded_copy_if_equal(model: nn.Module, size: tuple[int, int] = (64, 96), tolerance: float = 1e-4) -> tuple[nn.Module, int]:
    """A folded copy of `model` when folding changes its float32 features by less than
    `tolerance` (relative norm, on a random batch), else the model itself; and how many norms were
    folded (0: unchanged). The check guards against a block whose forward does more between the
    convolution and its norm than this module knows."""
    import copy

    folded = copy.deepcopy(model)
    count = fold_batch_norms(folded)
    if count == 0:
        return model, 0
    probe = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference, candidate = model.forward_features(probe), folded.forward_features(probe)
    change = float((reference - candidate).norm() / reference.norm().clamp_min(1e-12))
    return (folded, count) if change < tolerance else (model, 0)
