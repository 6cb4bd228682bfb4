"""Stage 3: blend the predictions of several trained configs.

Members must have predicted the same train images with the same folds, or their out-of-fold
predictions could not be compared (and a blend tuned on them would leak).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fishcomp.cache import Artifact
from fishcomp.config import EnsembleConfig, LoadedConfig, cache_key, dump_yaml, key_payload, member_configs
from fishcomp.console import stage_line
from fishcomp.errors import FishcompError
from fishcomp.metrics import KAGGLE_EPS, log_loss, normalise_rows
from fishcomp.stages.context import Context
from fishcomp.stages.predictions import Predictions, read_predictions
from fishcomp.stages.train import ensure_train

STAGE = "ensemble"


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


def cross_fitted_blend(probabilities: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, method: str) -> np.ndarray | None:
    """Each fold blended with weights fitted on the other folds: what fitting really gains.
    None when there is only one validated fold (a hold-out split)."""
    validated = sorted(f for f in np.unique(folds) if f >= 0)
    if len(validated) < 2:
        return None
    blended = np.full_like(probabilities[0], np.nan, dtype=np.float64)
    for fold in validated:
        rest, this = (folds >= 0) & (folds != fold), folds == fold
        weights = fit_weights([p[rest] for p in probabilities], labels[rest], method)
        blended[this] = blend([p[this] for p in probabilities], weights, method)
    return blended


def _check_aligned(names: list[str], members: list[Predictions]) -> None:
    first = members[0]
    for name, other in zip(names[1:], members[1:]):
        if other.classes != first.classes:
            raise FishcompError(f"ensemble members {names[0]} and {name} predict different classes")
        if not first.oof.image.equals(other.oof.image):
            raise FishcompError(f"ensemble members {names[0]} and {name} were trained on different images")
        if not first.oof.fold.equals(other.oof.fold):
            raise FishcompError(
                f"ensemble members {names[0]} and {name} use different folds; give them the same `split` section"
            )
        for split, frame in first.tests.items():
            if split not in other.tests or not frame.image.equals(other.tests[split].image):
                raise FishcompError(f"ensemble members {names[0]} and {name} predicted different {split} images")


def ensure_ensemble(ctx: Context, loaded: LoadedConfig, _chain: tuple[Path, ...] = ()) -> Artifact:
    config: EnsembleConfig | None = loaded.config.ensemble
    if config is None:
        raise FishcompError(f"{loaded.path} has no `ensemble` section")
    members = member_configs(loaded)
    # `_chain`: the configs that asked for this one as a pseudo-label source (to catch loops).
    trained = [ensure_train(ctx, member, _chain) for member in members]
    key = cache_key(STAGE, [a.key for a in trained], key_payload(config))
    artifact = ctx.cache.ensure(STAGE, loaded.name, key, lambda tmp: _build(loaded, members, trained, tmp))
    summary = json.loads(artifact.file("summary.json").read_text())
    scores = ", ".join(f"{m['name']} {m['valid_logloss']:.4f} x{m['weight']:.2f}" for m in summary["members"])
    stage_line(STAGE, artifact.built, artifact.path, f"blend {summary['valid_logloss']:.4f} ({scores})")
    return artifact


def _build(loaded: LoadedConfig, members: list[LoadedConfig], trained: list[Artifact], tmp: Path) -> dict:
    config = loaded.config.ensemble
    names = [m.name for m in members]
    predictions = [read_predictions(a) for a in trained]
    _check_aligned(names, predictions)
    first = predictions[0]
    classes = first.classes
    member_oof = [p.oof[classes].to_numpy(dtype=np.float64) for p in predictions]
    validated = (first.oof.fold >= 0).to_numpy()
    labels, folds = first.oof.label.to_numpy(), first.oof.fold.to_numpy()
    weights = [m.weight for m in config.members]
    cross_fitted = None
    if config.weights == "fitted":
        weights = fit_weights([p[validated] for p in member_oof], labels[validated], config.method).tolist()
        blended_cv = cross_fitted_blend([p[validated] for p in member_oof], labels[validated], folds[validated], config.method)
        if blended_cv is not None:
            cross_fitted = log_loss(labels[validated], blended_cv)
    oof = first.oof.copy()
    oof[classes] = blend(member_oof, weights, config.method)
    tests = {}
    for split, frame in first.tests.items():
        tests[split] = frame.copy()
        tests[split][classes] = blend([p.tests[split][classes].to_numpy() for p in predictions], weights, config.method)
    blended = Predictions(classes=classes, oof=oof, tests=tests)
    blended.write(tmp)
    summary = {
        "name": loaded.name,
        "method": config.method,
        "weights": config.weights,
        "members": [
            {
                "name": name, "weight": weight / sum(weights), "valid_logloss": p.oof_logloss(), "valid_accuracy": p.oof_accuracy(),
                "artifact": artifact.path.name,
            }
            for name, weight, p, artifact in zip(names, weights, predictions, trained)
        ],
        "valid_logloss": blended.oof_logloss(),
        # Fitted weights only: each fold blended with weights fitted on the other folds.
        "valid_logloss_cross_fitted": cross_fitted,
        "valid_accuracy": blended.oof_accuracy(),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / "config.yaml").write_text(dump_yaml(loaded.config.model_dump(mode="json")))
    return {"summary": summary}
