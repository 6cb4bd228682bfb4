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
from fishcomp.metrics import KAGGLE_EPS, normalise_rows
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
    scores = ", ".join(f"{m['name']} {m['valid_logloss']:.4f}" for m in summary["members"])
    stage_line(STAGE, artifact.built, artifact.path, f"blend {summary['valid_logloss']:.4f} ({scores})")
    return artifact


def _build(loaded: LoadedConfig, members: list[LoadedConfig], trained: list[Artifact], tmp: Path) -> dict:
    config = loaded.config.ensemble
    names = [m.name for m in members]
    predictions = [read_predictions(a) for a in trained]
    _check_aligned(names, predictions)
    weights = [m.weight for m in config.members]
    first = predictions[0]
    classes = first.classes
    oof = first.oof.copy()
    oof[classes] = blend([p.oof[classes].to_numpy() for p in predictions], weights, config.method)
    tests = {}
    for split, frame in first.tests.items():
        tests[split] = frame.copy()
        tests[split][classes] = blend([p.tests[split][classes].to_numpy() for p in predictions], weights, config.method)
    blended = Predictions(classes=classes, oof=oof, tests=tests)
    blended.write(tmp)
    summary = {
        "name": loaded.name,
        "method": config.method,
        "members": [
            {"name": name, "weight": weight, "valid_logloss": p.oof_logloss(), "valid_accuracy": p.oof_accuracy()}
            for name, weight, p in zip(names, weights, predictions)
        ],
        "valid_logloss": blended.oof_logloss(),
        "valid_accuracy": blended.oof_accuracy(),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / "config.yaml").write_text(dump_yaml(loaded.config.model_dump(mode="json")))
    return {"summary": summary}
