"""The calibrate stage's correction for a mean of fold models: on simulated noisy models, and through the CLI.

Each fold model's logits are the truth plus its own Gaussian noise: tau is the spread of the true
logits across images, sigma the noise, k the fold count. The truth is known, so both what the
estimator should read (1 - sigma^2 (1 - 1/k) / (tau^2 + sigma^2)) and the temperature ratio
the labels choose can be checked.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CONFIGS, SMALL, run_cli
from scipy.special import softmax

from fishcomp.blending import cross_fitted
from fishcomp.config import load_config
from fishcomp.metrics import log_loss
from fishcomp.stages.calibrate import Calibration, fit_calibration, fit_temperature, fold_mean_ratio


def _fold_models(rng, rows: int, tau: float, sigma: float, k: int, classes: int = 8):
    truth = rng.normal(0.0, tau, (rows, classes))
    # Labels drawn from the true probabilities (inverse CDF, one uniform per row).
    labels = (softmax(truth, axis=1).cumsum(axis=1) < rng.random((rows, 1))).sum(axis=1).clip(max=classes - 1)
    folds = softmax(truth[None] + rng.normal(0.0, sigma, (k, rows, classes)), axis=2)
    return labels, folds


@pytest.mark.parametrize("tau,sigma,k", [(1.5, 1.0, 5), (2.0, 1.5, 5), (1.0, 0.5, 3)])
def test_the_ratio_reads_the_noise_share_of_the_fold_models_spread(tau, sigma, k):
    _, folds = _fold_models(np.random.default_rng(0), 4000, tau, sigma, k)
    # Centring over the classes scales both variances by (1 - 1/8) alike; each is estimated from
    # 32,000 values (relative standard error under 1 %), so r is within 0.01 of its formula.
    assert fold_mean_ratio(folds) == pytest.approx(1 - sigma**2 * (1 - 1 / k) / (tau**2 + sigma**2), abs=0.01)


@pytest.mark.parametrize("tau,sigma", [(1.5, 1.0), (2.0, 1.5)])
def test_the_scaled_temperature_errs_on_the_safe_side_of_what_the_labels_choose(tau, sigma):
    """The labels want the mean of five noisy models sharpened further than r says (the linear
    theory behind r under-counts what averaging gains on a softmax): r lies between that ratio
    and 1, so the correction never sharpens past what the answers would choose here."""
    labels, folds = _fold_models(np.random.default_rng(1), 8000, tau, sigma, 5)
    single = np.mean([fit_temperature(labels, fold, (0.25, 4.0)) for fold in folds])
    chosen = fit_temperature(labels, folds.mean(axis=0), (0.25, 4.0)) / single
    # Seen over three seeds at 20,000 rows: chosen 0.63 / 0.51 against r 0.75 / 0.71, each steady to
    # 0.005 across seeds; a gap of 0.12 or more is far beyond what 8,000 rows move either.
    assert chosen < fold_mean_ratio(folds) < 1.0


def test_a_per_class_shift_and_temperature_are_recovered_from_a_model_that_leans_to_common_classes():
    """Calibrated probabilities distorted by a known temperature and per-class shift: the fit
    undoes both. 20,000 rows: the prior (sd 0.3, as a sum over rows) moves a shift by well under
    0.01, and each shift's standard error is about 0.03, so 0.1 is over three of them."""
    rng = np.random.default_rng(4)
    labels, folds = _fold_models(rng, 20000, 1.5, 0.0, 1)
    shift = np.array([0.5, -0.3, -0.2, 0.0, 0.4, -0.2, -0.1, -0.1])
    leaning = softmax(np.log(folds[0]) / 0.8 + shift, axis=1)
    fitted = fit_calibration(labels, leaning, (0.25, 4.0), bias_sd=0.3)
    assert fitted.temperature == pytest.approx(1 / 0.8, rel=0.05)
    np.testing.assert_allclose(fitted.bias, -(shift - shift.mean()) * 0.8, atol=0.1)  # (log p / 0.8 + shift) / T + b = log p
    np.testing.assert_allclose(fitted.apply(leaning), folds[0], atol=0.05)
    # Calibrated already: T near 1 and shifts near 0; T alone is the same T as before.
    plain = fit_calibration(labels, folds[0], (0.25, 4.0), bias_sd=0.3)
    assert plain.temperature == pytest.approx(1.0, abs=0.05) and np.abs(plain.bias).max() < 0.1
    assert fit_calibration(labels, folds[0], (0.25, 4.0)) == Calibration(fit_temperature(labels, folds[0], (0.25, 4.0)))


def test_folds_that_agree_or_a_single_model_leave_the_temperature_alone():
    _, folds = _fold_models(np.random.default_rng(2), 500, 1.5, 1.0, 5)
    assert fold_mean_ratio(np.repeat(folds[:1], 5, axis=0)) == pytest.approx(1.0)
    assert fold_mean_ratio(folds[:1]) == 1.0
    assert fold_mean_ratio(np.full((5, 10, 8), 1 / 8)) == 1.0  # no spread across images at all


def test_folds_that_share_nothing_but_noise_get_at_most_the_full_mean_correction():
    _, folds = _fold_models(np.random.default_rng(3), 4000, 0.0, 1.0, 5)
    assert fold_mean_ratio(folds) == pytest.approx(1 / 5, abs=0.01)
    assert fold_mean_ratio(folds) >= 1 / 5


def _run_calibrated(config: Path, tiny_data, tmp_path, capsys, *overrides) -> tuple[list, dict, str]:
    """Runs `config` on the tiny data; returns the run's arguments, its calibration's summary and stderr."""
    args = ["run", "-c", config, "--data", tiny_data, "--work", tmp_path / "work", "--out", tmp_path / "submission.csv"]
    for override in [*SMALL, *overrides]:
        args += ["--set", override]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    folder = Path(next(line.split()[2] for line in stdout.splitlines() if line.split()[:1] == ["calibrate"]))
    return args, json.loads((folder / "summary.json").read_text()), stderr


def _calibrated_linear_probe(tiny_data, tmp_path, capsys, *overrides):
    config = tmp_path / "linear_calibrated.yaml"
    config.write_text(f"extends: {CONFIGS / 'linear.yaml'}\nname: linear_calibrated\ncalibrate: {{}}\n")
    return _run_calibrated(config, tiny_data, tmp_path, capsys, *overrides)[1:]


def test_a_hold_out_model_is_scaled_by_t_alone_and_says_so(tiny_data, tmp_path, capsys):
    """One model predicts the test images: there is no mean of folds to correct for, and the run
    says why its test temperature is the fitted one."""
    summary, stderr = _calibrated_linear_probe(tiny_data, tmp_path, capsys, "split.kind=holdout")
    assert summary["test_temperatures"] == {"test_stg1": summary["temperature"], "test_stg2": summary["temperature"]}
    assert "has no fold models' test_stg1, test_stg2 predictions (a hold-out split" in stderr


def test_a_k_fold_model_gets_each_test_split_its_own_lower_temperature(tiny_data, tmp_path, capsys):
    summary, stderr = _calibrated_linear_probe(tiny_data, tmp_path, capsys)
    assert "no fold models'" not in stderr
    # Its cross-fitted rows (each fold scaled by a fit on the others) are kept for `fishcomp diff`.
    crossed = pd.read_csv(next((tmp_path / "work" / "calibrate").glob("linear_calibrated-*/oof_cross_fitted.csv")))
    crossed = crossed[crossed.fold >= 0]
    assert log_loss(crossed.label.to_numpy(), crossed.iloc[:, 3:].to_numpy()) == pytest.approx(summary["valid_logloss_cross_fitted"], abs=1e-9)
    for split in ("test_stg1", "test_stg2"):
        assert summary["temperature"] / 3 <= summary["test_temperatures"][split] < summary["temperature"]
    # Off, the fold mean gets the out-of-fold T as before.
    summary, _ = _calibrated_linear_probe(tiny_data, tmp_path, capsys, "calibrate.fold_spread=false")
    assert set(summary["test_temperatures"].values()) == {summary["temperature"]}


@pytest.mark.parametrize("bias", ["auto", "true", "false"])
def test_the_per_class_shift_is_kept_when_asked_or_when_it_wins_out_of_fold(bias, tiny_data, tmp_path, capsys):
    summary, _ = _calibrated_linear_probe(tiny_data, tmp_path, capsys, f"calibrate.bias={bias}")
    scores = summary["cross_fitted_by_kind"]
    if bias == "auto":
        assert set(scores) == {"temperature", "temperature_and_bias"}
        kept = scores["temperature_and_bias"] < scores["temperature"]
    else:
        kept = bias == "true"
        assert set(scores) == {"temperature_and_bias" if kept else "temperature"}
    assert summary["valid_logloss_cross_fitted"] == min(scores.values())
    assert (summary["bias"] is not None) == kept
    if kept:
        assert list(summary["bias"]) == ["ALB", "BET", "DOL", "LAG", "NoF", "OTHER", "SHARK", "YFT"]
        assert abs(sum(summary["bias"].values())) < 1e-9  # only differences between classes matter


def _calibrated_blend(tiny_data, tmp_path, capsys, *overrides) -> tuple[list, dict, str]:
    """A calibrated blend of the dense head and the dense head on a probe, with fitted weights (two
    members that differ: on these few images the dense layers on the probe are not kept, so the
    probe alone would be the second member twice)."""
    config = tmp_path / "two_probes.yaml"
    members = "".join(f"    - {{config: {CONFIGS / name}}}\n" for name in ("dense.yaml", "dense_probe.yaml"))
    config.write_text(f"name: two_probes\nensemble:\n  weights: fitted\n  members:\n{members}calibrate: {{}}\n")
    return _run_calibrated(config, tiny_data, tmp_path, capsys, *overrides)


def test_a_blend_is_calibrated_and_scored_on_rows_its_weights_never_saw(tiny_data, tmp_path, capsys):
    """The calibration's cross-fitted estimate scores each fold's cross-fitted blend rows (weights
    fitted on the other folds) scaled by a temperature fitted on the other folds: nothing fitted
    on the rows it is scored on, as for the test images. The blend's own rows, blended by weights
    that saw every fold, would flatter it."""
    _, summary, _ = _calibrated_blend(tiny_data, tmp_path, capsys, "calibrate.bias=false")
    blend = next((tmp_path / "work" / "ensemble").glob("two_probes-*"))
    own, crossed = (pd.read_csv(blend / name).query("fold >= 0") for name in ("oof.csv", "oof_cross_fitted.csv"))
    classes = list(own.columns[3:])
    labels, folds = own.label.to_numpy(), own.fold.to_numpy()
    own, crossed = own[classes].to_numpy(), crossed[classes].to_numpy()
    assert np.abs(own - crossed).max() > 1e-3  # fold-fitted weights differ from the full fit's
    bounds = load_config(CONFIGS / "pipeline.yaml").config.calibrate.bounds

    def estimate(scored):
        rows = cross_fitted([own], folds, lambda rest, this: fit_calibration(labels[rest], own[rest], bounds).apply(scored[this]))
        return log_loss(labels, rows)

    assert summary["valid_logloss_cross_fitted"] == pytest.approx(estimate(crossed), abs=1e-9)
    assert summary["valid_logloss_cross_fitted"] != pytest.approx(estimate(own), abs=1e-6)


def test_members_trained_before_fold_copies_are_named_and_the_blend_keeps_the_out_of_fold_t(tiny_data, tmp_path, capsys):
    """A cache from before fishcomp kept each fold model's test predictions: the same artifacts
    without the `*_probs_folds.npy` files (and their manifest without them). The run says which
    members to retrain for the correction, and submits with the fitted T instead of failing."""
    args = _calibrated_blend(tiny_data, tmp_path, capsys)[0]
    old = next((tmp_path / "work" / "train").glob("dense_probe-*"))
    manifest = json.loads((old / "manifest.json").read_text())
    for copies in old.glob("*_probs_folds.npy"):
        copies.unlink()
        del manifest["files"][copies.name]
    (old / "manifest.json").write_text(json.dumps(manifest))
    for stage in ("ensemble", "calibrate"):
        shutil.rmtree(next((tmp_path / "work" / stage).glob("two_probes-*")))
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "train      cached" in stdout  # the stripped member was not retrained behind the user's back
    assert f"1 member(s) were trained before fishcomp kept each fold model's test predictions (e.g. {old})" in stderr
    summary = json.loads(next((tmp_path / "work" / "calibrate").glob("two_probes-*/summary.json")).read_text())
    assert set(summary["test_temperatures"].values()) == {summary["temperature"]}
