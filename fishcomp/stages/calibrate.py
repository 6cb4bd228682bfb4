"""The calibrate stage: temperature scaling of a run's predictions, fitted out of fold.

Also the README's worked example of adding a stage: this module, the `calibrate:` section in
fishcomp/config.py and one import line in fishcomp/stages/__init__.py are all it took.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fishcomp.blending import cross_fitted
from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, key_payload
from fishcomp.console import warn
from fishcomp.context import Context
from fishcomp.graph import Node, Resolver, Stage, register_stage
from fishcomp.metrics import KAGGLE_EPS, log_loss, normalise_rows
from fishcomp.predictions import Predictions, predictions_stage, read_predictions


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return normalise_rows(np.exp(np.log(np.clip(probs, KAGGLE_EPS, 1.0)) / temperature))


def fit_temperature(labels: np.ndarray, probs: np.ndarray, bounds: tuple[float, float]) -> float:
    from scipy.optimize import minimize_scalar

    # In log T the loss is smooth and the interval symmetric about T = 1.
    found = minimize_scalar(lambda log_t: log_loss(labels, with_temperature(probs, np.exp(log_t))), bounds=np.log(bounds), method="bounded")
    return float(np.exp(found.x))


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
    summary = "temperature scaling of a run's predictions, the temperature fitted out of fold"

    def inputs(self, resolver: Resolver, loaded: LoadedConfig, **request) -> dict:
        return {"predictions": resolver.node(predictions_stage(loaded.config), loaded)}

    def params(self, ctx: Context, loaded: LoadedConfig, **request) -> dict:
        return {"calibrate": key_payload(loaded.config.calibrate)}

    def build(self, ctx: Context, node: Node, inputs: dict, tmp: Path) -> dict:
        before = read_predictions(inputs["predictions"])
        labels, probs = before.oof_labels(), before.oof_probs()
        bounds = node.loaded.config.calibrate.bounds
        temperature = fit_temperature(labels, probs, bounds)
        # The honest estimate, as the blend's: each fold scaled by a temperature fitted on the others.
        folds = before.validated.fold.to_numpy()
        held_out = cross_fitted([probs], folds, lambda rest, this: with_temperature(probs[this], fit_temperature(labels[rest], probs[rest], bounds)))
        oof = before.oof.copy()
        validated = (oof.fold >= 0).to_numpy()
        oof.loc[validated, before.classes] = with_temperature(probs, temperature)  # probs: these rows, in order
        test_temperatures = {split: temperature for split in before.tests}
        if node.loaded.config.calibrate.fold_spread:
            without = [split for split in before.tests if split not in before.test_folds]
            if without:
                warn(
                    f"calibrate  [{node.name}] {inputs['predictions'].path.name} has no fold models' {', '.join(without)} predictions "
                    "(a hold-out split, or trained by an older fishcomp): those test rows get the out-of-fold T"
                )
            for split, stacked in before.test_folds.items():
                test_temperatures[split] = temperature * fold_mean_ratio(stacked)
        tests = {
            split: frame.assign(**dict(zip(before.classes, with_temperature(frame[before.classes].to_numpy(dtype=float), test_temperatures[split]).T)))
            for split, frame in before.tests.items()
        }
        # Each fold model alone is what T was fitted for.
        test_folds = {split: np.stack([with_temperature(fold, temperature) for fold in stacked]) for split, stacked in before.test_folds.items()}
        after = Predictions(classes=before.classes, oof=oof, tests=tests, test_folds=test_folds)
        after.write(tmp)
        summary = {
            "name": node.name, "temperature": temperature, "valid_logloss_before": before.oof_logloss(), "valid_logloss": after.oof_logloss(),
            "valid_logloss_cross_fitted": None if held_out is None else log_loss(labels, held_out),
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
        return f"T={summary['temperature']:.3f}{tests}: valid logloss {summary['valid_logloss_before']:.4f} -> {summary['valid_logloss']:.4f}{crossed}"
