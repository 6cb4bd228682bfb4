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
        tests = {split: frame.assign(**dict(zip(before.classes, with_temperature(frame[before.classes].to_numpy(dtype=float), temperature).T)))
                 for split, frame in before.tests.items()}
        after = Predictions(classes=before.classes, oof=oof, tests=tests)
        after.write(tmp)
        summary = {
            "name": node.name, "temperature": temperature, "valid_logloss_before": before.oof_logloss(), "valid_logloss": after.oof_logloss(),
            "valid_logloss_cross_fitted": None if held_out is None else log_loss(labels, held_out),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        return {"summary": summary}

    def describe(self, artifact: Artifact) -> str:
        summary = json.loads(artifact.file("summary.json").read_text())
        honest = summary.get("valid_logloss_cross_fitted")
        crossed = "" if honest is None else f", cross-fitted {honest:.4f}"
        return f"T={summary['temperature']:.3f}: valid logloss {summary['valid_logloss_before']:.4f} -> {summary['valid_logloss']:.4f}{crossed}"
