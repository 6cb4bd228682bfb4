"""train.map_channels: the cached maps projected once onto whitened principal components, the
projection carried in each checkpoint so that predict reads raw maps as before."""

import numpy as np
import pandas as pd
import torch
from helpers import CONFIGS, SMALL, run_cli

from fishcomp.config import FcnHeadConfig
from fishcomp.models.heads import create_head
from fishcomp.training.map_projection import fit_projection, project, projected_head


def _correlated_maps(count=60, channels=48, size=(6, 8), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(channels, channels)) * np.linspace(3, 0.1, channels)
    pixels = rng.normal(size=(count * size[0] * size[1], channels)) @ mixing + 5.0
    return pixels.reshape(count, *size, channels).transpose(0, 3, 1, 2).astype(np.float16)


def test_projected_maps_have_unit_uncorrelated_channels():
    maps = _correlated_maps()  # 2880 pixels: all of them are used for the fit
    rows = np.arange(len(maps))
    mean, components = fit_projection(maps, rows, channels=12, seed=0)
    projected = project(maps, mean, components)
    assert projected.shape == (60, 12, 6, 8) and projected.dtype == np.float32
    pixels = projected.transpose(0, 2, 3, 1).reshape(-1, 12).astype(np.float64)
    # Whitened on exactly these pixels: the covariance is the identity up to float32 rounding.
    np.testing.assert_allclose(np.cov(pixels, rowvar=False), np.eye(12), atol=1e-3)
    np.testing.assert_allclose(pixels.mean(axis=0), 0.0, atol=1e-3)


def test_the_checkpoint_module_on_raw_maps_is_the_head_on_projected_maps():
    maps = _correlated_maps()
    mean, components = fit_projection(maps, np.arange(len(maps)), channels=12, seed=0)
    torch.manual_seed(0)
    head = create_head(FcnHeadConfig(channels=16, blocks=1), (12, 6, 8), 8).eval()
    raw = projected_head(head, mean, components).eval()
    with torch.no_grad():
        direct = head(torch.from_numpy(project(maps, mean, components)))["logits"]
        through = raw(torch.from_numpy(maps.astype(np.float32)))["logits"]
    # The same arithmetic in another order (a 1x1 convolution instead of a matrix product):
    # float32 rounding of O(1) whitened values, far below 1e-3.
    np.testing.assert_allclose(through.numpy(), direct.numpy(), atol=1e-3)
    assert not any(p.requires_grad for p in raw.projection.parameters())


def test_a_map_head_trains_on_projected_maps_and_predict_reads_raw_ones(tiny_data, tmp_path, capsys):
    sets = []
    for override in SMALL + ["train.map_channels=16", "train.phases=[{epochs: 3, lr: 1.0e-3}]"]:
        sets += ["--set", override]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "fcn.yaml", "--data", tiny_data, "--work", tmp_path / "work", *sets], capsys)
    assert code == 0, stderr
    folder = next((tmp_path / "work" / "train").glob("fcn-*"))
    checkpoint = torch.load(folder / "checkpoints" / "fold0.pt", weights_only=True)
    assert checkpoint["in_shape"][0] == 16 and checkpoint["projection"]["components"].shape == (1280, 16)
    sample = pd.read_csv(tiny_data / "sample_submission_stg1.csv").image.head(4).tolist()
    out = tmp_path / "predicted.csv"
    code, stdout, stderr = run_cli(["predict", "-c", CONFIGS / "fcn.yaml", *[tiny_data / "test_stg1" / n for n in sample],
                                    "--data", tiny_data, "--work", tmp_path / "work", "--out", out, *sets], capsys)
    assert code == 0, stderr
    assert "built" not in stdout
    expected = pd.read_csv(folder / "test_stg1.csv").set_index("image").loc[sample]
    # As in the predict test of whole-image heads: float16 features, batches of other sizes.
    np.testing.assert_allclose(pd.read_csv(out).iloc[:, 1:].to_numpy(), expected.to_numpy(), atol=5e-3)
