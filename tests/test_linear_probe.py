"""The linear probe's fit: scikit-learn's optimum, also when warm-started from the inner fit."""

import numpy as np
import pytest

from fishcomp.training.linear import _fit


def _blobs(seed: int, n: int = 300, dim: int = 20, classes: int = 4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    centres = rng.normal(0, 1.0, size=(classes, dim))
    return centres[y] + rng.normal(0, 1.5, size=(n, dim)), y


# L2 makes the loss strictly convex (curvature at least 1 / (C n) = 1/30 at C 0.1 on 300 rows), so
# every run stops near one optimum, only as near as L-BFGS's stopping rule (each of 84 gradient
# components below 1e-5, a gradient norm below ~1e-4): coefficients within ~3e-3 of it, logits on
# inputs of norm ~8 within ~0.03, probabilities within ~0.01. A fit at a neighbouring strength
# (C 0.03 or 0.3 instead of 0.1) moves them by ~0.16, so the tests can fail.
SAME_OPTIMUM = 0.025


# In float32 (`head.fit_dtype`'s default) the objective's gradient carries rounding of about
# sqrt(300 rows) x 6e-8 x its terms' size ~1e-6 per component, a tenth of the stopping rule's 1e-5:
# the same bound holds.
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_probe_reaches_scikit_learns_optimum_of_the_same_objective(dtype):
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(2)
    probe, converged = _fit(x, y, 0.1, 500, 4, dtype=dtype)
    assert probe.weight.dtype == np.dtype(dtype)
    reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=5000).fit(x, y)
    assert converged
    _assert_same_optimum(probe, reference, x)


def _assert_same_optimum(warm, cold, x):
    np.testing.assert_array_equal(warm.classes_, cold.classes_)
    np.testing.assert_allclose(warm.predict_proba(x), cold.predict_proba(x), atol=SAME_OPTIMUM)


def test_refit_warm_started_from_the_inner_fit_reaches_the_cold_optimum():
    x, y = _blobs(0)
    inner, _ = _fit(x[:240], y[:240], 0.1, 500, 4)
    warm, converged = _fit(x, y, 0.1, 500, 4, inner)
    cold, _ = _fit(x, y, 0.1, 500, 4)
    assert converged
    _assert_same_optimum(warm, cold, x)
    neighbour, _ = _fit(x, y, 0.3, 500, 4)
    assert np.abs(neighbour.predict_proba(x) - cold.predict_proba(x)).max() > 2 * SAME_OPTIMUM


def test_refit_starts_cold_when_the_inner_fit_never_saw_a_class():
    x, y = _blobs(1)
    without_rare = y != 3
    inner, _ = _fit(x[without_rare], y[without_rare], 0.1, 500, 4)
    assert list(inner.classes_) == [0, 1, 2]
    refit, _ = _fit(x, y, 0.1, 500, 4, inner)  # other coefficient shapes: must not be reused
    _assert_same_optimum(refit, _fit(x, y, 0.1, 500, 4)[0], x)


def test_repeated_inner_splits_choose_the_strength_by_its_mean_and_keep_the_first_split():
    import pandas as pd

    from fishcomp.config import LinearHeadConfig
    from fishcomp.training.linear import ProbeRows, fit_fold_probe

    x, y = _blobs(3, n=200)
    positions = np.arange(160)  # the fold's training positions; 160-199 would be its validation
    rows = ProbeRows(x, [], y)
    fits = {}
    for repeats in (1, 3):
        records: list = []
        head = LinearHeadConfig(strengths=[0.001, 0.01, 0.1, 1.0], inner_repeats=repeats)
        fits[repeats] = (fit_fold_probe(rows, positions, head, seed=0, fold=0, classes=4, records=records, started=0.0), records)
    probe, records = fits[3]
    frame = pd.DataFrame(records)
    # Every strength on every split; the choice is the lowest mean over the three splits.
    assert len(frame) == 12 and sorted(frame.repeat.unique()) == [0, 1, 2]
    assert probe.strength == frame.groupby("strength").inner_logloss.mean().idxmin()
    # Three different held-out parts of the fold's training positions, each a fifth of them.
    helds = [set(inner.valid) for inner in probe.inner]
    assert all(len(h) == 32 and h <= set(positions) for h in helds) and len(set(map(frozenset, helds))) == 3
    # The first split is the one a single split draws: repeats add splits, they change none.
    single, single_records = fits[1]
    np.testing.assert_array_equal(single.inner[0].valid, probe.inner[0].valid)
    np.testing.assert_allclose(pd.DataFrame(single_records).inner_logloss, frame[frame.repeat == 0].inner_logloss.to_numpy())
    assert "repeat" not in single_records[0]


def test_rows_that_train_with_photos_come_once_and_are_never_held_out():
    """`ProbeRows(widen=...)` (the crops' further crops, `crops.candidates.train`): a photo's own
    rows come once per copy, the rows widened in come once, and the inner splits hold out photos
    only, so a further crop never scores the strength it trained."""
    from fishcomp.config import LinearHeadConfig
    from fishcomp.training.linear import ProbeRows, fit_fold_probe

    x, y = _blobs(3, n=120)
    x = x.astype(np.float32)  # as ProbeRows holds them
    photos = 100  # rows 100-119: crops, row 100 + k belonging to photo 5 * k
    owner = np.arange(20) * 5
    widen = lambda positions: np.concatenate([positions, photos + np.flatnonzero(np.isin(owner, positions))])  # noqa: E731
    rows = ProbeRows(x, [x[:photos] + 1.0], y, widen=widen)
    fitted, labels = rows(np.array([0, 1, 5]))
    # Photos 0, 1, 5, their copies, then the crops of photos 0 and 5 once each.
    np.testing.assert_array_equal(fitted, np.concatenate([x[[0, 1, 5, 100, 101]], x[[0, 1, 5]] + 1.0]))
    np.testing.assert_array_equal(labels, y[[0, 1, 5, 100, 101, 0, 1, 5]])
    probe = fit_fold_probe(rows, np.arange(80), LinearHeadConfig(strengths=[0.01, 0.1]), seed=0, fold=0, classes=4, records=[], started=0.0)
    held = set(probe.inner[0].valid)
    assert held <= set(range(80)) and len(held) == 16


def test_a_refit_scale_refits_less_penalised_than_chosen_and_changes_nothing_else():
    from fishcomp.config import LinearHeadConfig
    from fishcomp.training.linear import ProbeRows, fit_fold_probe, _probs

    x, y = _blobs(4, n=200)
    positions, rows = np.arange(160), ProbeRows(x, [], y)
    plain, scaled = (fit_fold_probe(rows, positions, LinearHeadConfig(strengths=[0.001, 0.01, 0.1], refit_scale=scale), seed=0, fold=0,
                                    classes=4, records=[], started=0.0) for scale in (None, 3.0))
    # The same choice on the same inner split, recorded as chosen; only the refit differs.
    assert scaled.strength == plain.strength and plain.refit_strength is None and scaled.refit_strength == 3.0 * plain.strength
    np.testing.assert_array_equal(scaled.inner[0].valid, plain.inner[0].valid)
    # The refit is the optimum at three times the chosen C (as a cold fit there finds it), not at C.
    standardised = (x[positions] - scaled.mean) / scaled.scale
    at_scaled, _ = _fit(standardised, y[positions], 3.0 * plain.strength, 500, 4)
    _assert_same_optimum(scaled.model, at_scaled, standardised)
    assert np.abs(_probs(scaled.model, standardised, 4) - _probs(plain.model, standardised, 4)).max() > 2 * SAME_OPTIMUM


def test_an_inner_bag_chooses_the_strength_by_its_members_mean_on_the_same_split():
    """`head.inner_bag`: the held images scored by the mean of probes fitted on all but one part of
    the inner split's training images each (the folds' mean in small), the single probe's score
    still recorded beside it."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from fishcomp.config import LinearHeadConfig
    from fishcomp.metrics import log_loss
    from fishcomp.training.linear import InnerBag, ProbeRows, fit_fold_probe

    x, y = _blobs(5, n=200)
    positions, rows = np.arange(160), ProbeRows(x, [], y)
    strengths = [0.001, 0.01, 0.1, 1.0]
    runs = {}
    for bag in (None, 4):
        records: list = []
        probe = fit_fold_probe(rows, positions, LinearHeadConfig(strengths=strengths, inner_bag=bag), seed=0, fold=0, classes=4,
                               records=records, started=0.0)
        runs[bag] = probe, pd.DataFrame(records).set_index("strength")
    (plain, plain_records), (bagged, bagged_records) = runs[None], runs[4]
    # The same inner split and the same single probes; the choice is the lowest mean's.
    np.testing.assert_array_equal(bagged.inner[0].valid, plain.inner[0].valid)
    np.testing.assert_array_equal(bagged_records.inner_single_logloss, plain_records.inner_logloss)
    assert bagged.strength == bagged_records.inner_logloss.idxmin()
    assert "inner_single_logloss" not in plain_records
    # Each member leaves out a different quarter of the inner training images (the bag rebuilt
    # from the seed fit_fold_probe gives it: its fold's, 31, the split's).
    inner_train, held = bagged.inner[0].train, bagged.inner[0].valid
    bag = InnerBag(rows, inner_train, LinearHeadConfig(inner_bag=4), [0, 0, 31, 0], 4)
    assert [len(member.y) for member in bag.members] == [96, 96, 96, 96]  # 128 images, 32 out each
    for strength in strengths:  # increasing, as the members warm-start
        bag.fit(strength)
        mean = bag.probs(rows.originals[held])
        # The recorded score is this mean's (the same fits, repeated) ...
        np.testing.assert_allclose(bagged_records.inner_logloss[strength], log_loss(y[held], mean), rtol=1e-9)
        # ... and each member is at scikit-learn's optimum for its own rows.
        reference = np.mean([LogisticRegression(C=strength, tol=1e-10, max_iter=5000).fit(member.x, member.y)
                             .predict_proba((x[held] - member.mean) / member.scale) for member in bag.members], axis=0)
        np.testing.assert_allclose(mean, reference, atol=SAME_OPTIMUM)
    # Averaging four probes is not one probe: the scores differ where the penalty is weak.
    assert abs(bagged_records.inner_logloss[1.0] - bagged_records.inner_single_logloss[1.0]) > 0.01


def test_a_probe_run_with_an_inner_bag_records_both_scores_and_draws_them(tiny_data, tmp_path, capsys):
    import pandas as pd
    from PIL import Image

    from fishcomp import viz
    from helpers import CONFIGS, SMALL, run_cli

    frames = {}
    for work, overrides in ((tmp_path / "plain", []), (tmp_path / "bagged", ["head.inner_bag=3"])):
        sets = [item for override in [*SMALL, *overrides] for item in ("--set", override)]
        code, _, stderr = run_cli(["train", "-c", CONFIGS / "linear.yaml", "--data", tiny_data, "--work", work, *sets], capsys)
        assert code == 0, stderr
        frames[work.name] = pd.read_csv(next((work / "train").glob("linear-*")) / "metrics.csv")
    plain, bagged = (frame[frame.inner_logloss.notna()] for frame in (frames["plain"], frames["bagged"]))
    # The same inner splits and single probes as without the bag: their scores recorded beside the bag's.
    np.testing.assert_array_equal(bagged.inner_single_logloss.to_numpy(), plain.inner_logloss.to_numpy())
    assert not np.allclose(bagged.inner_logloss.to_numpy(), plain.inner_logloss.to_numpy())
    # Each fold keeps the strength whose bag scored lowest.
    chosen = frames["bagged"][frames["bagged"].chosen == True].set_index("fold").strength  # noqa: E712
    np.testing.assert_array_equal(chosen.sort_index().to_numpy(), bagged.loc[bagged.groupby("fold").inner_logloss.idxmin()].sort_values("fold").strength)
    figure = viz.training_curves(frames["bagged"], tmp_path / "curves.png")
    assert Image.open(figure).size[0] > 0


def test_a_feature_nearly_constant_in_training_cannot_make_a_new_image_confidently_wrong():
    """A pooled channel that is zero on every training image but one, where it is at rounding
    level (1e-3), is divided by its standard deviation, ~1e-3 / sqrt(160). An image on which the
    channel really fires (1.0, a new boat) then gets a standardised value of ~12,600: any weight the
    probe gave that one row's channel (up to C x 12.6 at stationarity, 0.1 here) moves its logits by
    hundreds. With the scale floored at a tenth of the median feature's (~0.18 on these blobs) the
    training row's value is ~0.006, so the weight is at most C x (0.006 + 160 x 4e-5) ~ 1e-3 and the
    firing image's ~5.5 moves each logit by < 0.01: its probabilities by less than that."""
    from fishcomp.config import LinearHeadConfig
    from fishcomp.training.linear import ProbeRows, fit_fold_probe

    x, y = _blobs(5, n=200)
    spike = np.zeros((len(x), 1))
    spike[7] = 1e-3  # one training image
    x = np.hstack([x, spike])
    train, new = np.arange(160), x[160:].copy()
    fired = new.copy()
    fired[:, -1] = 1.0
    moved = {}
    for floor in (0.0, 0.1):
        probe = fit_fold_probe(ProbeRows(x, [], y), train, LinearHeadConfig(strengths=[0.1], scale_floor=floor), seed=0, fold=0,
                               classes=4, records=[], started=0.0)
        moved[floor] = np.abs(probe.predict(fired, 4) - probe.predict(new, 4)).max()
    assert moved[0.1] < 0.01
    assert moved[0.0] > 0.5  # the rows' own deviations, as before the floor
