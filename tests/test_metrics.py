import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from fishcomp.metrics import accuracy, do_clip, eps_clip, fold_mean_gain, log_loss, prior_log_loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_loss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    probs = rng.random((50, 8)) ** 3  # unnormalised rows: Kaggle divides each by its sum first
    labels = rng.integers(0, 8, 50)
    expected = sk_log_loss(labels, probs / probs.sum(1, keepdims=True), labels=range(8))
    assert log_loss(labels, probs) == pytest.approx(expected, rel=1e-10)


def test_log_loss_clips_certain_mistakes_like_kaggle():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert log_loss(np.array([1, 1]), probs) == pytest.approx(-np.log(1e-15) / 2, rel=1e-6)


def test_uniform_is_ln8_and_prior_beats_it_on_skewed_labels():
    labels = np.array([0] * 90 + [1] * 10)
    assert log_loss(labels, np.full((100, 8), 1 / 8)) == pytest.approx(np.log(8))
    assert prior_log_loss(labels, labels, 8) < np.log(8) / 2


def test_do_clip_is_the_lessons_formula():
    probs = np.array([[0.99, 0.01, 0, 0, 0, 0, 0, 0]])
    clipped = do_clip(probs, 0.82)
    assert clipped[0, 0] == pytest.approx(0.82)
    assert clipped[0, 2] == pytest.approx(0.18 / 7)
    assert clipped[0, 1] == pytest.approx(0.18 / 7)


def test_eps_clip_bounds_and_renormalises():
    probs = np.array([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    clipped = eps_clip(probs, 0.01)
    np.testing.assert_allclose(clipped.sum(1), 1.0)
    assert clipped.min() > 0.009
    np.testing.assert_allclose(clipped[1], 0.25)


def test_clipping_rescues_a_confident_mistake():
    labels = np.array([1])
    probs = np.array([[1.0, 0.0, 0, 0, 0, 0, 0, 0]])
    assert log_loss(labels, eps_clip(probs, 0.01)) < 5 < log_loss(labels, probs)
    assert accuracy(labels, probs) == 0.0


def test_fold_mean_gain_is_the_mean_gain_were_the_mean_the_truth():
    # Two fold models on one image: (0.8, 0.2) and (0.4, 0.6); their mean (0.6, 0.4).
    folds = np.array([[[0.8, 0.2]], [[0.4, 0.6]]])
    # KL(mean || each) by hand: 0.6 ln(0.6/0.8) + 0.4 ln(0.4/0.2) and 0.6 ln(0.6/0.4) + 0.4 ln(0.4/0.6).
    by_hand = (0.6 * np.log(0.75) + 0.4 * np.log(2.0) + 0.6 * np.log(1.5) + 0.4 * np.log(2 / 3)) / 2
    assert fold_mean_gain(folds) == pytest.approx(by_hand, rel=1e-12)
    # The same, as the expected log loss of one fold model less the mean's, labels drawn from the mean.
    one, mean = [sum(0.6 * -np.log(p[0]) + 0.4 * -np.log(p[1]) for p in ps) / len(ps) for ps in ([(0.8, 0.2), (0.4, 0.6)], [(0.6, 0.4)])]
    assert fold_mean_gain(folds) == pytest.approx(one - mean, rel=1e-12)
    # Fold models that agree gain nothing from their mean.
    rng = np.random.default_rng(0)
    same = rng.dirichlet(np.ones(8), size=30)
    assert fold_mean_gain(np.stack([same] * 5)) == pytest.approx(0.0, abs=1e-12)
    assert fold_mean_gain(rng.dirichlet(np.ones(8), size=(5, 30))) > 0
