"""The paired comparison of two runs' out-of-fold predictions (`fishcomp diff`), on made-up rows
whose answers are known."""

import numpy as np
import pandas as pd
import pytest

from fishcomp.commands.diff import compare_frames
from fishcomp.metrics import difference_verdict as verdict
from fishcomp.metrics import paired_difference
from fishcomp.errors import FishcompError


def test_a_constant_difference_has_no_spread_and_a_clear_verdict():
    loss_a = np.linspace(0.1, 2.0, 50)
    row = paired_difference(loss_a, loss_a - 0.1, resamples=500, rng=np.random.default_rng(0))
    assert row["difference"] == pytest.approx(-0.1) and row["low"] == pytest.approx(-0.1) and row["high"] == pytest.approx(-0.1)
    assert row["b_better"] == 50 and row["b_worse"] == 0 and verdict(row) == "B better"
    assert verdict(paired_difference(loss_a, loss_a + 0.1, 500, np.random.default_rng(0))) == "A better"


def test_the_interval_is_as_wide_as_the_differences_spread_says():
    # 400 differences of standard deviation 1: the mean's 95 % interval is about 2 x 1.96 / 20 =
    # 0.196 wide; 2000 draws estimate each end to within a few thousandths.
    rng = np.random.default_rng(3)
    differences = rng.standard_normal(400)
    row = paired_difference(np.zeros(400), differences, resamples=2000, rng=np.random.default_rng(0))
    spread = differences.std() / np.sqrt(400)
    assert row["high"] - row["low"] == pytest.approx(2 * 1.96 * spread, rel=0.1)
    assert row["low"] < differences.mean() < row["high"]


def _frame(labels, probs, images=None):
    frame = pd.DataFrame(probs, columns=["ALB", "NoF"])
    frame.insert(0, "fold", 0)
    frame.insert(0, "label", labels)
    frame.index = images if images is not None else [f"img_{i}.jpg" for i in range(len(labels))]
    return frame


def test_runs_are_paired_on_their_common_images_and_per_class():
    labels = np.array([0, 0, 1, 1])
    a = _frame(labels, [[0.6, 0.4], [0.6, 0.4], [0.4, 0.6], [0.4, 0.6]])
    b = _frame(labels, [[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    b = pd.concat([b, _frame([1], [[0.5, 0.5]], images=["extra.jpg"])])
    result = compare_frames(a, b, resamples=200)
    every, alb, nof = result["rows"]
    assert result["only_a"] == 0 and result["only_b"] == 1 and every["images"] == 4
    assert alb["scope"] == "ALB" and alb["difference"] == pytest.approx(np.log(0.6) - np.log(0.9))
    assert nof["difference"] == pytest.approx(0.0) and nof["b_better"] == nof["b_worse"] == 0
    assert every["difference"] == pytest.approx((np.log(0.6) - np.log(0.9)) / 2)


def test_runs_on_other_data_are_refused():
    a = _frame(np.array([0, 1]), [[0.6, 0.4], [0.4, 0.6]])
    with pytest.raises(FishcompError, match="different labels"):
        compare_frames(a, _frame(np.array([1, 1]), [[0.6, 0.4], [0.4, 0.6]]), resamples=200)
    with pytest.raises(FishcompError, match="no image in common"):
        compare_frames(a, _frame(np.array([0]), [[0.6, 0.4]], images=["other.jpg"]), resamples=200)
    with pytest.raises(FishcompError, match="at least 100"):
        compare_frames(a, a, resamples=10)


def test_resampling_whole_boats_widens_the_interval_where_boats_disagree():
    # Six boats of 50 images: on three B is better by 1 on every image, on three worse by 1. By
    # image the mean 0 looks sure (about 1.96 / sqrt(300) = 0.11 either side); by boat it rests on
    # six draws of +-1 (about 1.96 / sqrt(6) = 0.8 either side).
    groups = np.repeat(np.arange(6), 50)
    differences = np.where(groups < 3, -1.0, 1.0)
    by_image = paired_difference(np.zeros(300), differences, 2000, np.random.default_rng(0))
    by_boat = paired_difference(np.zeros(300), differences, 2000, np.random.default_rng(0), groups=groups)
    assert by_image["difference"] == by_boat["difference"] == pytest.approx(0.0)
    assert by_image["groups"] is None and by_boat["groups"] == 6
    assert by_image["high"] - by_image["low"] == pytest.approx(2 * 1.96 / np.sqrt(300), rel=0.15)
    assert by_boat["high"] - by_boat["low"] > 4 * (by_image["high"] - by_image["low"])


def test_too_few_boats_to_resample_is_refused():
    labels = np.array([0, 1] * 10)
    a = _frame(labels, [[0.6, 0.4], [0.4, 0.6]] * 10)
    b = _frame(labels, [[0.7, 0.3], [0.3, 0.7]] * 10)
    four_boats = lambda images: [f"boat{i % 4}" for i in range(len(images))]  # noqa: E731
    with pytest.raises(FishcompError, match="4 boats"):
        compare_frames(a, b, resamples=200, groups_of=four_boats)
    five_boats = lambda images: [f"boat{i % 5}" for i in range(len(images))]  # noqa: E731
    assert compare_frames(a, b, resamples=200, groups_of=five_boats)["rows"][0]["groups"] == 5
