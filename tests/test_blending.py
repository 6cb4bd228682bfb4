"""Fitted ensemble weights and tuned clipping, on predictions with known properties."""

import numpy as np
import pytest

from fishcomp.blending import blend, cross_fitted_blend, fit_weights
from fishcomp.config import ClipConfig, SubmitConfig
from fishcomp.errors import FishcompError
from fishcomp.metrics import log_loss
from fishcomp.stages.submit import apply_clip, tune_clip


def _predictions(labels, sharpness, noise, rng):
    logits = rng.normal(0, noise, (len(labels), 8))
    logits[np.arange(len(labels)), labels] += sharpness
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["mean", "geometric"])
def test_fitted_weights_favour_the_informative_member_and_never_lose_to_the_best(method):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 400)
    good, weak, noise = _predictions(labels, 2.0, 1.0, rng), _predictions(labels, 0.7, 1.0, rng), _predictions(labels, 0.0, 1.0, rng)
    weights = fit_weights([good, weak, noise], labels, method)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    assert weights[0] > weights[1] > weights[2] - 1e-6
    fitted = log_loss(labels, blend([good, weak, noise], weights, method))
    assert fitted <= min(log_loss(labels, p) for p in (good, weak, noise)) + 1e-12
    assert fitted <= log_loss(labels, blend([good, weak, noise], [1, 1, 1], method)) + 1e-12


def test_cross_fitted_blend_scores_each_fold_with_weights_from_the_others():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, 300)
    members = [_predictions(labels, 1.5, 1.0, rng), _predictions(labels, 1.0, 1.0, rng)]
    folds = np.arange(300) % 3
    blended = cross_fitted_blend(members, labels, folds, "mean")
    assert blended.shape == (300, 8) and not np.isnan(blended).any()
    # It differs from the in-sample fit (weights are refitted per fold) but stays close to it.
    in_sample = blend(members, fit_weights(members, labels, "mean"), "mean")
    assert abs(log_loss(labels, blended) - log_loss(labels, in_sample)) < 0.05
    assert cross_fitted_blend(members, labels, np.zeros(300, dtype=int), "mean") is None  # one fold: nothing to cross-fit


def test_tuned_clip_rescues_overconfident_predictions_and_never_hurts():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 8, 500)
    # 99.9 % sure every time, and wrong on 15 % of the rows.
    predicted = np.where(rng.random(500) < 0.85, labels, (labels + rng.integers(1, 8, 500)) % 8)
    overconfident = np.full((500, 8), 0.001 / 7)
    overconfident[np.arange(500), predicted] = 0.999
    clip = tune_clip(labels, overconfident)
    assert clip.kind in ("eps", "do_clip")
    assert log_loss(labels, apply_clip(overconfident, clip)) < log_loss(labels, overconfident) - 0.5
    for probs in (overconfident, _predictions(labels, 1.0, 1.0, rng), np.full((500, 8), 1 / 8)):
        tuned = tune_clip(labels, probs)
        assert log_loss(labels, apply_clip(probs, tuned)) <= log_loss(labels, probs) + 1e-12


def test_clip_auto_is_a_word_in_the_config():
    assert SubmitConfig.model_validate({"clip": "auto"}).clip == ClipConfig(kind="auto")
    with pytest.raises(ValueError):
        apply_clip(np.full((2, 8), 1 / 8), ClipConfig(kind="auto"))


@pytest.mark.parametrize("method", ["mean", "geometric"])
def test_ensemble_selection_starts_from_the_best_member_never_loses_to_it_and_drops_noise(method):
    from fishcomp.blending import select_weights

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 8, 400)
    members = [_predictions(labels, 1.2, 1.0, rng), _predictions(labels, 2.0, 1.0, rng), _predictions(labels, 0.0, 3.0, rng)]
    weights = select_weights(members, labels, method)
    assert weights.sum() == pytest.approx(1.0) and weights.min() >= 0
    assert weights[1] == weights.max() and weights[2] == 0  # pure noise never helps
    assert log_loss(labels, blend(members, weights, method)) <= log_loss(labels, members[1]) + 1e-12


def test_the_stacker_is_cross_fitted_and_learns_which_member_to_trust():
    from fishcomp.blending import cross_fitted_stack, fit_stacker, stack_predict

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 8, 600)
    members = [_predictions(labels, 2.0, 1.0, rng), _predictions(labels, 0.0, 1.0, rng)]
    folds = np.arange(600) % 4
    stacked = cross_fitted_stack(members, labels, folds, 0.1)
    assert stacked.shape == (600, 8) and np.allclose(stacked.sum(axis=1), 1.0)
    # Scored only on folds it never saw, it still beats the uniform prior by far and is near the good member.
    assert log_loss(labels, stacked) < np.log(8) - 0.5
    assert log_loss(labels, stacked) < log_loss(labels, members[0]) + 0.1
    full = stack_predict(fit_stacker(members, labels, 0.1), members, 8)
    assert full.shape == (600, 8)


def test_auto_blending_picks_the_candidate_with_the_lowest_cross_fitted_log_loss():
    from fishcomp.config import EnsembleConfig
    from fishcomp.stages.ensemble import choose_blend

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 8, 400)
    members = [_predictions(labels, 1.5, 1.0, rng), _predictions(labels, 1.0, 1.0, rng), _predictions(labels, 0.0, 1.0, rng)]
    config = EnsembleConfig(members=[{"config": f"m{i}.yaml"} for i in range(3)], weights="auto")
    kind, candidates, chosen, rows = choose_blend(config, members, labels, np.arange(400) % 4)
    assert set(candidates) == {"fitted", "selection", "stack"}
    assert kind == min(candidates, key=candidates.get) and chosen == candidates[kind]
    assert log_loss(labels, rows) == pytest.approx(chosen)  # the chosen kind's own cross-fitted rows
    holdout = np.where(np.arange(400) % 5 == 0, 0, -1)
    assert choose_blend(config, members, labels, holdout)[0] == "fitted"  # one fold: nothing to cross-fit
    # Asked for by name, the stacker on one fold would leave the out-of-fold rows empty: refused.
    stack = EnsembleConfig(members=[{"config": f"m{i}.yaml"} for i in range(3)], weights="stack")
    with pytest.raises(FishcompError, match="hold-out split"):
        choose_blend(stack, members, labels, holdout)


def test_the_blend_is_set_against_its_best_member_image_by_image():
    from fishcomp.stages.ensemble import versus_best_member

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 8, 300)
    weak, strong = _predictions(labels, 0.5, 1.0, rng), _predictions(labels, 2.0, 1.0, rng)
    # The blend's rows equal to the best member's: nothing between them, whatever the draw.
    same = versus_best_member(["weak", "strong"], [weak, strong], strong, labels)
    assert same["member"] == "strong" and same["difference"] == 0 and same["low"] == same["high"] == 0
    assert same["b_better"] == same["b_worse"] == 0
    # Halfway to the weak member, the blend is worse on every image the strong one got more right.
    halfway = versus_best_member(["weak", "strong"], [weak, strong], (weak + strong) / 2, labels)
    assert halfway["difference"] == pytest.approx(log_loss(labels, (weak + strong) / 2) - log_loss(labels, strong))
    assert halfway["low"] > 0
    assert versus_best_member(["weak", "strong"], [weak, strong], None, labels) is None  # nothing honest to compare
