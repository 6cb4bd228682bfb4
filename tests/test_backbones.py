import numpy as np
import pytest
import torch
from PIL import Image

from fishcomp.config import PrecomputeConfig
from fishcomp.errors import FishcompError
from fishcomp.models.backbones import (
    OFFLINE_BACKBONES,
    OFFLINE_PACKAGES,
    create_backbone,
)


def classify(backbone, image: Image.Image, name: str = "efficientnet_lite0") -> torch.Tensor:
    """ImageNet probabilities from the offline weights (re-attaching the 1000-way classifier)."""
    import importlib

    _, module, holder = OFFLINE_PACKAGES[name]
    weights = torch.load(getattr(importlib.import_module(module), holder).get_model_file_path(), map_location="cpu", weights_only=True)
    classifier = torch.nn.Linear(backbone.num_features, 1000)
    classifier.weight.data, classifier.bias.data = weights["_fc.weight"], weights["_fc.bias"]
    x = torch.from_numpy(np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(backbone.mean)[:, None, None]) / torch.tensor(backbone.std)[:, None, None]
    with torch.inference_mode():
        features = backbone.model(x[None])
        return classifier(features).softmax(-1)[0]


@pytest.mark.parametrize("name", OFFLINE_BACKBONES)
def test_offline_weights_see_a_cat(name):
    from skimage.data import chelsea

    backbone = create_backbone(PrecomputeConfig(backbone=name, weights="offline"))
    probs = classify(backbone, Image.fromarray(chelsea()), name)
    assert 281 <= int(probs.argmax()) <= 285  # ImageNet's cat classes
    assert probs[281:286].sum() > 0.7


def test_random_weights_do_not_see_a_cat_confidently():
    from skimage.data import chelsea

    backbone = create_backbone(PrecomputeConfig(weights="none"))
    backbone.mean, backbone.std = (0.5,) * 3, (0.5,) * 3
    assert classify(backbone, Image.fromarray(chelsea()))[281:286].sum() < 0.5


def test_a_weights_file_loads_through_timm(tmp_path):
    offline = create_backbone(PrecomputeConfig(weights="offline"))
    path = tmp_path / "lite0.pth"
    torch.save(offline.model.state_dict(), path)
    from_file = create_backbone(PrecomputeConfig(weights=str(path)))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(from_file.model(x), offline.model(x))


@pytest.mark.parametrize(
    "config, message",
    [
        (PrecomputeConfig(backbone="efficientnet_lite9"), r"unknown backbone `efficientnet_lite9`; did you mean efficientnet_lite"),
        (PrecomputeConfig(backbone="resnet18", weights="offline"), r"offline weights exist only for .*weights: hub"),
        (PrecomputeConfig(weights="/no/such/file.pth"), r"no such file /no/such/file.pth"),
    ],
)
def test_backbone_errors_are_actionable(config, message):
    with pytest.raises(FishcompError, match=message):
        create_backbone(config)


def test_hub_offline_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FishcompError, match=r"could not download .*weights: offline .*weights: none"):
        create_backbone(PrecomputeConfig(backbone="resnet18", weights="hub"))


def test_weights_file_for_another_model(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(FishcompError, match="not weights for efficientnet_lite0"):
        create_backbone(PrecomputeConfig(weights=str(path)))


@pytest.mark.parametrize("name", OFFLINE_BACKBONES)
def test_a_frozen_float32_pass_folds_every_batch_norm_and_sees_the_same(name):
    """Folding a norm into its convolution reorders a few float32 operations per layer: about
    1e-7 relative each, some 50 layers deep, so well under 1e-5 on the features, while a norm
    folded wrongly would move them by order 1. The cat stays a cat."""
    from skimage.data import chelsea

    from fishcomp.features import Embedder

    config = PrecomputeConfig(backbone=name, weights="offline", precision="fp32")
    plain = create_backbone(config)
    folded = Embedder(config, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    x = torch.from_numpy(np.asarray(Image.fromarray(chelsea()).resize((320, 240)), dtype=np.float32)).permute(2, 0, 1)[None]
    x = (x / 255 - torch.tensor(plain.mean)[:, None, None]) / torch.tensor(plain.std)[:, None, None]
    with torch.inference_mode():
        reference, features = plain.model.forward_features(x), folded.model.forward_features(x.contiguous(memory_format=torch.channels_last))
    assert float((features - reference).norm() / reference.norm()) < 1e-5
    folded.backbone.model = folded.model  # classify() reads the backbone's model
    assert 281 <= int(classify(folded.backbone, Image.fromarray(chelsea()), name).argmax()) <= 285


def test_fine_tuning_and_float16_passes_keep_their_batch_norms():
    from fishcomp.features import Embedder, folds_norms

    fp32 = PrecomputeConfig(weights="offline", precision="fp32")
    embedder = Embedder(fp32, torch.device("cpu"), frozen=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in embedder.model.modules())  # trained: its statistics move
    assert not folds_norms(torch.float16)  # a folded weight could leave float16's range
    assert folds_norms(None) and folds_norms(torch.bfloat16)


@pytest.mark.parametrize("name", OFFLINE_BACKBONES)
def test_a_frozen_bf16_pass_folds_its_norms_and_rounds_no_worse_than_with_them(name):
    """bf16 keeps 8 significant bits, so every layer of a bf16 pass moves its output by a few
    parts in a thousand and some 50 layers compound that into a few per cent of the map's norm.
    Folding rounds each folded weight once instead of the weight and then the norm's output: the
    same kind and number of roundings, so the folded pass stays as close to the float32 map as the
    unfolded one, within a factor of two, while a norm folded wrongly would move it by order 1."""
    from skimage.data import chelsea

    from fishcomp.context import autocast
    from fishcomp.features import Embedder, backbone_precision

    config = PrecomputeConfig(backbone=name, weights="offline", precision="bf16")
    plain = create_backbone(config)
    folded = Embedder(config, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert backbone_precision(config) == "bf16, norms folded"  # other features than the unfolded pass's: keyed apart
    x = torch.from_numpy(np.asarray(Image.fromarray(chelsea()).resize((320, 240)), dtype=np.float32)).permute(2, 0, 1)[None]
    x = ((x / 255 - torch.tensor(plain.mean)[:, None, None]) / torch.tensor(plain.std)[:, None, None]).contiguous(memory_format=torch.channels_last)
    bf16 = autocast(torch.bfloat16, torch.device("cpu"))
    with torch.inference_mode():
        reference = plain.model.forward_features(x)
        with bf16:
            unfolded, features = plain.model.forward_features(x).float(), folded.model.forward_features(x).float()

    def error(maps):
        return float((maps - reference).norm() / reference.norm())

    assert error(features) < max(2 * error(unfolded), 1e-3)
    folded.backbone.model = folded.model  # classify() reads the backbone's model
    with bf16:
        assert 281 <= int(classify(folded.backbone, Image.fromarray(chelsea()), name).argmax()) <= 285
