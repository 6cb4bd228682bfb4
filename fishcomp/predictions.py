"""The predictions that train and ensemble artifacts both hold, in one shape.

`oof`: image, label, fold, then one probability column per class (NaN where never validated);
`tests`: split -> image, then probabilities. Both are plain CSV in the artifact, so they can be
read with anything. `test_folds`: split -> each fold model's own test probabilities (folds x rows x
classes, rows as in the CSV, which holds their mean), where the artifact has them. `cross_fitted`:
for a blend or a calibration, which fit something on the out-of-fold rows themselves, the same rows
with each fold's from a fit on the other folds only: the honest ones to compare runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.data.layout import TEST_SPLITS
from fishcomp.metrics import accuracy, log_loss

OOF_COLUMNS = ["image", "label", "fold"]
CROSS_FITTED = "oof_cross_fitted.csv"
# The stages whose artifacts hold predictions in this format (out of fold and per test split).
PREDICTING_STAGES = ("train", "ensemble", "calibrate")


def test_folds_file(split: str) -> str:
    return f"{split}_probs_folds.npy"


def predictions_stage(config, calibrated: bool = False) -> str:
    """The stage whose artifact holds a run config's predictions: its blend, else its head; with
    `calibrated`, its calibrate stage first, when the config has one."""
    if calibrated and config.calibrate is not None:
        return "calibrate"
    return "ensemble" if config.ensemble is not None else "train"


@dataclass
class Predictions:
    classes: list[str]
    oof: pd.DataFrame
    tests: dict[str, pd.DataFrame]
    # Absent for a hold-out split (one model) and for artifacts built before fishcomp kept them.
    test_folds: dict[str, np.ndarray] = field(default_factory=dict)
    # `oof`'s shape; None where nothing was fitted on those rows (a trained head) or nothing could
    # be cross-fitted (a hold-out split), and in artifacts built before fishcomp kept them.
    cross_fitted: pd.DataFrame | None = None

    @property
    def validated(self) -> pd.DataFrame:
        return self.oof[self.oof.fold >= 0]

    def oof_probs(self) -> np.ndarray:
        return self.validated[self.classes].to_numpy(dtype=np.float64)

    def oof_labels(self) -> np.ndarray:
        return self.validated.label.to_numpy()

    @property
    def validated_cross_fitted(self) -> pd.DataFrame:
        """The validated rows, cross-fitted where they were kept, else their own (a single head's
        out-of-fold rows are already fitted without their fold)."""
        return self.validated if self.cross_fitted is None else self.cross_fitted[self.cross_fitted.fold >= 0]

    def cross_fitted_probs(self) -> np.ndarray:
        return self.validated_cross_fitted[self.classes].to_numpy(dtype=np.float64)

    def oof_logloss(self) -> float:
        return log_loss(self.oof_labels(), self.oof_probs())

    def oof_accuracy(self) -> float:
        return accuracy(self.oof_labels(), self.oof_probs())

    def with_cross_fitted(self, rows: np.ndarray | None) -> Predictions:
        """These predictions with `rows` (one per validated image, in order) as the cross-fitted ones."""
        if rows is None:
            return self
        frame = self.oof.copy()
        frame.loc[(frame.fold >= 0).to_numpy(), self.classes] = rows
        return Predictions(self.classes, self.oof, self.tests, self.test_folds, frame)

    def write(self, folder: Path) -> None:
        self.oof.to_csv(folder / "oof.csv", index=False)
        if self.cross_fitted is not None:
            self.cross_fitted.to_csv(folder / CROSS_FITTED, index=False)
        for split, frame in self.tests.items():
            frame.to_csv(folder / f"{split}.csv", index=False)
        for split, stacked in self.test_folds.items():
            np.save(folder / test_folds_file(split), stacked.astype(np.float32))


def read_predictions(artifact: Artifact, tests: bool = True) -> Predictions:
    """The artifact's predictions; `tests=False` reads the out-of-fold rows only (for tables that
    compare many runs out of fold)."""
    oof = pd.read_csv(artifact.file("oof.csv"))
    classes = [c for c in oof.columns if c not in OOF_COLUMNS]
    splits = TEST_SPLITS if tests else ()
    frames = {split: pd.read_csv(artifact.file(f"{split}.csv")) for split in splits if artifact.file(f"{split}.csv").is_file()}
    test_folds = {
        split: np.load(artifact.file(test_folds_file(split))).astype(np.float64)
        for split in frames if artifact.file(test_folds_file(split)).is_file()
    }
    crossed = pd.read_csv(artifact.file(CROSS_FITTED)) if artifact.file(CROSS_FITTED).is_file() else None
    return Predictions(classes=classes, oof=oof, tests=frames, test_folds=test_folds, cross_fitted=crossed)
