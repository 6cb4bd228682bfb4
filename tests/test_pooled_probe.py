"""The linear probe on the map pooled by its maximum or generalised mean (`head.pool`)."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CONFIGS, SMALL, run_cli

from fishcomp.config import DenseHeadConfig, LinearHeadConfig, load_config
from fishcomp.models.heads import create_head, head_uses_map
from fishcomp.models.pooling import GEM_POWER, pool_map, pooled_rows

CLASSES = ["ALB", "BET", "DOL", "LAG", "NoF", "OTHER", "SHARK", "YFT"]


def test_gem_lies_between_the_average_and_the_maximum_and_weighs_a_small_bright_patch_more():
    maps = torch.rand(4, 6, 12, 20)
    average, maximum, gem = maps.mean(dim=(2, 3)), pool_map(maps, "max"), pool_map(maps, "gem")
    torch.testing.assert_close(maximum, maps.amax(dim=(2, 3)), rtol=0, atol=0)
    # The power-mean inequality: mean <= (mean x^3)^(1/3) <= max, strictly for uneven cells.
    assert bool((gem > average).all()) and bool((gem < maximum).all())
    # A fish: one channel lit in 2 of 240 cells. Its average is 2/240 of the value, its GeM
    # (2/240)^(1/3): about twenty times more.
    fish = torch.zeros(1, 1, 12, 20)
    fish[0, 0, 5, 7:9] = 6.0
    assert pool_map(fish, "gem").item() == pytest.approx(6.0 * (2 / 240) ** (1 / GEM_POWER), rel=1e-5)
    assert pool_map(fish, "gem").item() > 20 * fish.mean().item()


def test_cached_maps_are_pooled_a_chunk_at_a_time_as_the_head_pools_a_batch():
    array = np.random.default_rng(0).uniform(0, 6, size=(23, 8, 12, 20)).astype(np.float16)
    for pool in ("max", "gem"):
        whole = pool_map(torch.from_numpy(array), pool).numpy()
        # The same arithmetic; only the summation order of a batch's kernel may differ: float32
        # sums of 240 positive cells agree to a few ulps (~1e-7 relative), far below 1e-5.
        np.testing.assert_allclose(pooled_rows(array, pool, chunk=5), whole, rtol=1e-5, atol=0)


def test_a_pooling_probe_reads_the_map_and_a_dense_base_cannot_pool():
    assert not head_uses_map(LinearHeadConfig()) and head_uses_map(LinearHeadConfig(pool="gem"))
    with pytest.raises(ValueError, match="head.base.pool: max reads the map"):
        DenseHeadConfig(base=LinearHeadConfig(pool="max"))
    # Pooling is in the key; the average (no pool) keeps the key every probe had before.
    assert "pool" not in load_config(CONFIGS / "linear_360x640.yaml").config.head.model_dump(exclude_none=True)
    head = create_head(LinearHeadConfig(pool="gem"), (1280, 12, 20), 8).eval()
    with torch.no_grad():
        assert head(torch.rand(3, 1280, 12, 20))["logits"].shape == (3, 8)


def test_gem_probe_trains_on_the_cached_map_and_its_checkpoints_predict_its_test_predictions(tiny_data, tmp_path, capsys):
    work = tmp_path / "work"
    sets = [item for override in SMALL for item in ("--set", override)]
    for config in ("linear_360x640.yaml", "linear_360x640_gem.yaml"):
        code, _, stderr = run_cli(["train", "-c", CONFIGS / config, "--data", tiny_data, "--work", work, *sets], capsys)
        assert code == 0, stderr
    folder = {name: next((work / "train").glob(f"{name}-*")) for name in ("linear_360x640", "linear_360x640_gem")}
    # Same images, folds and strengths; only the pooling differs, and so do the predictions.
    gem_oof = pd.read_csv(folder["linear_360x640_gem"] / "oof.csv")
    avg_oof = pd.read_csv(folder["linear_360x640"] / "oof.csv")
    assert np.abs(gem_oof[CLASSES].to_numpy() - avg_oof[CLASSES].to_numpy()).max() > 1e-2
    np.testing.assert_allclose(gem_oof[CLASSES].sum(axis=1), 1.0, atol=1e-6)

    # `predict` on raw images through the folds' checkpoints (the module pools the map itself)
    # gives the run's own test predictions (fitted on the numbers pooled from the cache).
    sample = pd.read_csv(tiny_data / "sample_submission_stg1.csv").image.head(4).tolist()
    out = tmp_path / "predicted.csv"
    code, _, stderr = run_cli(["predict", "-c", CONFIGS / "linear_360x640_gem.yaml", *[tiny_data / "test_stg1" / n for n in sample],
                               "--data", tiny_data, "--work", work, "--out", out, *sets], capsys)
    assert code == 0, stderr
    expected = pd.read_csv(folder["linear_360x640_gem"] / "test_stg1.csv").set_index("image").loc[sample]
    # As in the predict test of whole-image heads: float16 features, batches of other sizes.
    np.testing.assert_allclose(pd.read_csv(out).iloc[:, 1:].to_numpy(), expected.to_numpy(), atol=5e-3)
