"""Every registered head, tested for free: forward shapes, and a short training that learns."""

import numpy as np
import pytest
import torch

from fishcomp.config import DenseHeadConfig
from fishcomp.models.heads import create_head, head_uses_map, list_heads

CONFIGS = {"dense": DenseHeadConfig(), "dense-map": DenseHeadConfig(input="map")}


def config_for(kind):
    return CONFIGS[kind]


def shapes(config):
    return (64, 5, 7) if head_uses_map(config) else (64,)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_shapes_and_interface(name):
    config = config_for(name)
    head = create_head(config, shapes(config), 8)
    head.eval()
    x = torch.randn(4, *shapes(config))
    out = head(x)
    assert out["logits"].shape == (4, 8)
    features = head.forward_features(x)
    assert features.shape == (4, head.num_features)
    torch.testing.assert_close(head.forward_head(features), out["logits"])
    head.reset_classifier(3)
    assert head(x)["logits"].shape == (4, 3)


def test_every_registered_head_has_a_test_config():
    assert set(list_heads()) <= {c.kind for c in CONFIGS.values()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_short_training_lowers_the_loss(name):
    torch.manual_seed(0)
    config = config_for(name)
    in_shape = shapes(config)
    labels = torch.arange(96) % 8
    centres = torch.randn(8, *in_shape)
    x = centres[labels] + 0.8 * torch.randn(96, *in_shape)
    head = create_head(config, in_shape, 8)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        head.train()
        loss = torch.nn.functional.cross_entropy(head(x)["logits"], labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
