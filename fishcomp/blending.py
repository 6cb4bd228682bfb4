"""Blending predictions: ensemble weights (given, fitted, cross-fitted) and the NoF blend of a
crop classifier with a whole-image model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig
from fishcomp.errors import FishcompError
from fishcomp.metrics import KAGGLE_EPS, log_loss, normalise_rows
from fishcomp.predictions import read_predictions


def blend(probabilities: list[np.ndarray], weights: list[float], method: str) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])
    if method == "geometric":
        logs = np.log(np.clip(stacked, KAGGLE_EPS, 1.0))
        return normalise_rows(np.exp(np.tensordot(w, logs, axes=1)))
    return np.tensordot(w, stacked, axes=1)


def fit_weights(probabilities: list[np.ndarray], labels: np.ndarray, method: str) -> np.ndarray:
    """Non-negative weights summing to one that minimise the blend's log loss on these rows.

    Started from every single member and from equal weights, and the best of all those points is
    kept, so the fitted blend is never worse than its best member on the rows it was fitted on.
    """
    from scipy.optimize import minimize

    count = len(probabilities)

    def loss(weights: np.ndarray) -> float:
        weights = np.clip(weights, 0.0, None)
        return log_loss(labels, blend(probabilities, weights / max(weights.sum(), 1e-12), method))

    starts = [np.eye(count)[i] for i in range(count)] + [np.full(count, 1.0 / count)]
    best = min(starts, key=loss)
    result = minimize(
        loss, np.full(count, 1.0 / count), method="SLSQP", bounds=[(0.0, 1.0)] * count,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}], options={"ftol": 1e-10, "maxiter": 200},
    )
    if result.success and loss(result.x) < loss(best):
        best = result.x
    best = np.clip(best, 0.0, None)
    return best / best.sum()


def select_weights(probabilities: list[np.ndarray], labels: np.ndarray, method: str, rounds: int = 100) -> np.ndarray:
    """Ensemble selection (Caruana et al., ICML 2004): start from the best single member, then
    repeatedly add (with replacement) the member whose addition lowers the blend's log loss most,
    until no addition helps; weights are the counts. Never worse than the best member on these
    rows, and sparse: members that never help get weight zero."""
    count = len(probabilities)
    single = [log_loss(labels, p) for p in probabilities]
    counts = np.zeros(count)
    counts[int(np.argmin(single))] = 1
    best = min(single)
    for _ in range(rounds - 1):
        trials = [log_loss(labels, blend(probabilities, counts + np.eye(count)[i], method)) for i in range(count)]
        pick = int(np.argmin(trials))
        if trials[pick] >= best - 1e-9:
            break
        counts[pick] += 1
        best = trials[pick]
    return counts / counts.sum()


WEIGHT_FITTERS = {"fitted": fit_weights, "selection": select_weights}


def cross_fitted(probabilities: list[np.ndarray], folds: np.ndarray, fit_and_apply) -> np.ndarray | None:
    """Each validated fold predicted by `fit_and_apply(rest, this)` fitted on the other folds
    only. None with a single validated fold (nothing to fit on)."""
    validated = sorted(f for f in np.unique(folds) if f >= 0)
    if len(validated) < 2:
        return None
    out = np.full_like(probabilities[0], np.nan, dtype=np.float64)
    for fold in validated:
        rest, this = (folds >= 0) & (folds != fold), folds == fold
        out[this] = fit_and_apply(rest, this)
    return out


def cross_fitted_blend(probabilities: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, method: str, kind: str = "fitted") -> np.ndarray | None:
    """Each fold blended with weights fitted (`kind`: fitted or selection) on the other folds
    only: an honest estimate of what fitting gains."""

    def fit_and_apply(rest, this):
        weights = WEIGHT_FITTERS[kind]([p[rest] for p in probabilities], labels[rest], method)
        return blend([p[this] for p in probabilities], weights, method)

    return cross_fitted(probabilities, folds, fit_and_apply)


def _stack_features(probabilities: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.log(np.clip(p, KAGGLE_EPS, 1.0)) for p in probabilities], axis=1)


def fit_stacker(probabilities: list[np.ndarray], labels: np.ndarray, strength: float):
    """A level-2 model: multinomial logistic regression (L2) on the members' log-probabilities."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=strength, max_iter=1000).fit(_stack_features(probabilities), labels)


def stack_predict(stacker, probabilities: list[np.ndarray], classes: int) -> np.ndarray:
    out = np.full((len(probabilities[0]), classes), 1e-6)
    out[:, stacker.classes_] = stacker.predict_proba(_stack_features(probabilities))
    return normalise_rows(out)


def cross_fitted_stack(probabilities: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, strength: float) -> np.ndarray | None:
    """Each fold predicted by a stacker fitted on the other folds' out-of-fold predictions."""

    def fit_and_apply(rest, this):
        stacker = fit_stacker([p[rest] for p in probabilities], labels[rest], strength)
        return stack_predict(stacker, [p[this] for p in probabilities], probabilities[0].shape[1])

    return cross_fitted(probabilities, folds, fit_and_apply)



def blend_nof(crop_probs: np.ndarray, whole_probs: np.ndarray, weight: float, nof: int) -> np.ndarray:
    """P(NoF) mixed from both models; the fish classes keep the crop model's proportions."""
    blended = np.array(crop_probs, dtype=np.float64)
    p_nof = (1 - weight) * crop_probs[:, nof] + weight * whole_probs[:, nof]
    fish = np.delete(blended, nof, axis=1)
    fish *= ((1 - p_nof) / np.clip(fish.sum(axis=1), 1e-12, None))[:, None]
    blended = np.insert(fish, nof, p_nof, axis=1)
    return blended


def blend_nof_with_whole(loaded: LoadedConfig, whole: Artifact, oof: pd.DataFrame, tests: dict, labels, validated, test_folds: dict | None = None) -> dict:
    """Blend the whole-image model's P(NoF) into the crop classifier's predictions, in place
    (and into each fold model's test predictions, `test_folds`: split -> folds x rows x classes)."""
    settings = loaded.config.crops.nof
    classes = [c for c in oof.columns if c not in ("image", "label", "fold")]
    if "NoF" not in classes:
        raise FishcompError(f"{loaded.path}: crops.nof needs a NoF class; the data has {', '.join(classes)}")
    nof = classes.index("NoF")
    other = read_predictions(whole)
    if other.classes != classes:
        raise FishcompError(f"crops.nof.whole of {loaded.path}: {whole.path.name} predicts classes {other.classes}, not {classes}")

    def aligned(frame: pd.DataFrame, images: pd.Series, what: str) -> np.ndarray:
        found = frame.set_index("image").reindex(images)[classes]
        if found.isna().any(axis=None):
            raise FishcompError(
                f"crops.nof.whole of {loaded.path}: {whole.path.name} has no {what} prediction for some images "
                "(a hold-out split?); use a k-fold whole-image model"
            )
        return found.to_numpy()

    crops_alone = log_loss(labels[validated], oof[classes].to_numpy()[validated])
    whole_oof = aligned(other.oof, oof.image[validated], "out-of-fold")
    blended = oof[classes].to_numpy(copy=True)
    weight = settings.weight
    if weight == "auto":
        shares = np.linspace(0.0, 1.0, 21)
        losses = [log_loss(labels[validated], blend_nof(blended[validated], whole_oof, w, nof)) for w in shares]
        weight = round(float(shares[int(np.argmin(losses))]), 2)
    blended[validated] = blend_nof(blended[validated], whole_oof, weight, nof)
    oof[classes] = blended
    for split, frame in tests.items():
        if split not in other.tests:
            raise FishcompError(f"crops.nof.whole of {loaded.path}: {whole.path.name} did not predict {split}; rebuild it on this data")
        whole_test = aligned(other.tests[split], frame.image, split)
        frame[classes] = blend_nof(frame[classes].to_numpy(), whole_test, weight, nof)
        if test_folds is not None:
            test_folds[split] = np.stack([blend_nof(fold, whole_test, weight, nof) for fold in test_folds[split]])
    return {
        "whole": whole.path.name, "weight": weight, "weight_setting": settings.weight, "crops_alone": crops_alone,
        "whole_image": log_loss(labels[validated], whole_oof), "blended": log_loss(labels[validated], blended[validated]),
    }
