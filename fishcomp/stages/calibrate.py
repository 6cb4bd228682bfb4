"""The calibrate stage: temperature scaling of a run's predictions, fitted out of fold (with a
per-class shift where that wins out of fold, and the test rows' T scaled for a mean of fold models).

Also the README's worked example of adding a stage: this module, the `calibrate:` section in
fishcomp/config.py and one import line in fishcomp/stages/__init__.py are all it took.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import log_softmax, softmax

from fishcomp.blending import cross_fitted
from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, key_payload
from fishcomp.console import warn
from fishcomp.context import Context
from fishcomp.graph import Node, Resolver, Stage, register_stage
from fishcomp.metrics import KAGGLE_EPS, log_loss
from fishcomp.predictions import Predictions, predictions_stage, read_predictions


@dataclass(frozen=True)
class Calibration:
    """log p / T plus, optionally, a per-class shift, then the softmax."""

    temperature: float
    bias: np.ndarray | None = None

    def apply(self, probs: np.ndarray, temperature: float | None = None) -> np.ndarray:
        logits = np.log(np.clip(probs, KAGGLE_EPS, 1.0)) / (temperature or self.temperature)
        return softmax(logits if self.bias is None else logits + self.bias, axis=1)


def fit_temperature(labels: np.ndarray, probs: np.ndarray, bounds: tuple[float, float]) -> float:
    from scipy.optimize import minimize_scalar

    # In log T the loss is smooth and the interval symmetric about T = 1.
    found = minimize_scalar(lambda log_t: log_loss(labels, Calibration(np.exp(log_t)).apply(probs)), bounds=np.log(bounds), method="bounded")
    return float(np.exp(found.x))


def fit_calibration(labels: np.ndarray, probs: np.ndarray, bounds: tuple[float, float], bias_sd: float | None = None) -> Calibration:
    """T alone, or with `bias_sd` T and a per-class shift under a Gaussian prior of that sd."""
    from scipy.optimize import minimize

    temperature = fit_temperature(labels, probs, bounds)
    if bias_sd is None:
        return Calibration(temperature)
    logs = np.log(np.clip(probs, KAGGLE_EPS, 1.0))
    rows, classes = probs.shape
    # The prior as a sum over rows, in the mean's units: it binds less as the rows grow.
    penalty = 1.0 / (2.0 * bias_sd**2 * rows)

    def loss(x: np.ndarray) -> float:
        chosen = log_softmax(logs / np.exp(x[0]) + x[1:], axis=1)[np.arange(rows), labels]
        return float(-chosen.mean() + penalty * np.sum(x[1:] ** 2))

    start = np.concatenate([[np.log(temperature)], np.zeros(classes)])
    found = minimize(loss, start, method="L-BFGS-B", bounds=[tuple(np.log(bounds))] + [(None, None)] * classes)
    return Calibration(float(np.exp(found.x[0])), found.x[1:] - found.x[1:].mean())


def fold_mean_ratio(test_folds: np.ndarray) -> float:
    """How much lower a temperature the mean of k fold models earns than one of them (r <= 1).

    Model each fold's centred log-probabilities as truth plus its own noise: one model's best
    temperature grows with (tau2 + s2) / tau2, the mean's with (tau2 + s2 / k) / tau2, so their
    ratio is 1 - s2 (1 - 1/k) / (tau2 + s2). s2 is the fold models' variance about their mean,
    tau2 + s2 one model's variance across images. At least 1/k (all of it noise)."""
    k = len(test_folds)
    logs = np.log(np.clip(test_folds, KAGGLE_EPS, 1.0))
    logs -= logs.mean(axis=2, keepdims=True)
    across_images = logs.var(axis=1).mean()
    if k < 2 or across_images <= 0:
        return 1.0
    between_folds = logs.var(axis=0, ddof=1).mean()
    return float(np.clip(1.0 - between_folds * (1.0 - 1.0 / k) / across_images, 1.0 / k, 1.0))


@register_stage
class Calibrate(Stage):
    name = "calibrate"
    section = "calibrate"
    declares = ("calibrate",)
    summary = "temperature scaling of a run's predictions (and a per-class shift), fitted out of fold"
    saves_config = True

    def inputs(self, resolver: Resolver, loaded: LoadedConfig, **request) -> dict:
        return {"predictions": resolver.node(predictions_stage(loaded.config), loaded)}

    def params(self, ctx: Context, loaded: LoadedConfig, **request) -> dict:
        # Since the estimate scores each fold's cross-fitted blend rows (below), which can change
        # the kind `bias: auto` keeps, a calibration scored on the blend's own rows is rebuilt.
        return {"calibrate": key_payload(loaded.config.calibrate), "scores": "cross_fitted_rows"}

    def build(self, ctx: Context, node: Node, inputs: dict, tmp: Path) -> dict:
        settings = node.loaded.config.calibrate
        before = read_predictions(inputs["predictions"])
        labels, probs = before.oof_labels(), before.oof_probs()
        folds = before.validated.fold.to_numpy()
        # A blend's own rows were blended by weights fitted on every fold, this one's included;
        # its cross-fitted rows were not, so they are what a fold held out sees.
        unseen = before.cross_fitted_probs()
        kinds = {"temperature": None, "temperature_and_bias": settings.bias_sd}
        if settings.bias != "auto":
            kinds = {k: v for k, v in kinds.items() if (v is not None) == settings.bias}

        def honest(bias_sd) -> np.ndarray | None:
            # Each fold's cross-fitted rows calibrated by a fit on the other folds' rows, as the
            # submission's test rows are by the fit on all of them: blend and calibration both
            # fitted without the fold they are scored on.
            return cross_fitted([probs], folds, lambda rest, this: fit_calibration(labels[rest], probs[rest], settings.bounds, bias_sd).apply(unseen[this]))

        held_out = {kind: honest(bias_sd) for kind, bias_sd in kinds.items()}
        scores = {kind: None if rows is None else log_loss(labels, rows) for kind, rows in held_out.items()}
        # auto without folds to cross-fit (a hold-out split) keeps T alone, the fewer parameters.
        kind = min(kinds, key=lambda k: scores[k]) if None not in scores.values() else next(iter(kinds))
        calibration = fit_calibration(labels, probs, settings.bounds, kinds[kind])
        oof = before.oof.copy()
        validated = (oof.fold >= 0).to_numpy()
        oof.loc[validated, before.classes] = calibration.apply(probs)  # probs: these rows, in order
        test_temperatures = {split: calibration.temperature for split in before.tests}
        if settings.fold_spread:
            without = [split for split in before.tests if split not in before.test_folds]
            if without:
                warn(
                    f"calibrate  [{node.name}] {inputs['predictions'].path.name} has no fold models' {', '.join(without)} predictions "
                    "(a hold-out split, or trained by an older fishcomp): those test rows get the out-of-fold T"
                )
            for split, stacked in before.test_folds.items():
                test_temperatures[split] = calibration.temperature * fold_mean_ratio(stacked)
        tests = {
            split: frame.assign(**dict(zip(before.classes, calibration.apply(frame[before.classes].to_numpy(dtype=float), test_temperatures[split]).T)))
            for split, frame in before.tests.items()
        }
        # Each fold model alone is what T was fitted for.
        test_folds = {split: np.stack([calibration.apply(fold) for fold in stacked]) for split, stacked in before.test_folds.items()}
        after = Predictions(classes=before.classes, oof=oof, tests=tests, test_folds=test_folds).with_cross_fitted(held_out[kind])
        after.write(tmp)
        summary = {
            "name": node.name, "temperature": calibration.temperature,
            "bias": None if calibration.bias is None else dict(zip(before.classes, calibration.bias.tolist())),
            "bias_setting": settings.bias,
            "valid_logloss_before": before.oof_logloss(), "valid_logloss": after.oof_logloss(),
            "valid_logloss_cross_fitted": scores[kind],
            # Each candidate's, whichever was kept: what `bias: auto` chose between.
            "cross_fitted_by_kind": scores,
            # The temperature each test split's fold mean got (T times its fold_mean_ratio).
            "test_temperatures": test_temperatures,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        return {"summary": summary}

    def describe(self, artifact: Artifact) -> str:
        summary = json.loads(artifact.file("summary.json").read_text())
        honest = summary.get("valid_logloss_cross_fitted")
        crossed = "" if honest is None else f", cross-fitted {honest:.4f}"
        scaled = {split: t for split, t in summary.get("test_temperatures", {}).items() if t != summary["temperature"]}
        tests = f" (fold mean: {', '.join(f'{split} {t:.3f}' for split, t in scaled.items())})" if scaled else ""
        shifted = " and a per-class shift" if summary.get("bias") else ""
        return f"T={summary['temperature']:.3f}{tests}{shifted}: valid logloss {summary['valid_logloss_before']:.4f} -> {summary['valid_logloss']:.4f}{crossed}"
