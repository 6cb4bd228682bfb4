"""Validation folds, as one integer per train image: the fold it is validated in, -1 for never."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import (
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)

from fishcomp.config import SplitConfig
from fishcomp.errors import FishcompError


def assign_folds(labels: np.ndarray, split: SplitConfig, groups=None) -> np.ndarray:
    """`groups` (one key per image, e.g. its original size) is used by `group_kfold` only."""
    labels = np.asarray(labels)
    n = len(labels)
    folds = np.full(n, -1, dtype=np.int64)
    if split.kind == "group_kfold":
        groups = np.asarray(groups)
        distinct = len(np.unique(groups))
        if distinct < split.folds:
            raise FishcompError(
                f"split.kind=group_kfold needs at least split.folds={split.folds} groups (image sizes), "
                f"the train set has {distinct}; lower split.folds"
            )
        splitter = StratifiedGroupKFold(n_splits=split.folds, shuffle=True, random_state=split.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for fold, (_, valid) in enumerate(splitter.split(np.zeros(n), labels, groups)):
                folds[valid] = fold
        return folds
    if split.kind == "kfold":
        if n < split.folds:
            raise FishcompError(f"split.folds={split.folds} but only {n} train images")
        splitter = StratifiedKFold(n_splits=split.folds, shuffle=True, random_state=split.seed)
        with warnings.catch_warnings():
            # A class rarer than the fold count cannot be in every fold; sklearn warns, we accept.
            warnings.simplefilter("ignore", UserWarning)
            for fold, (_, valid) in enumerate(splitter.split(np.zeros(n), labels)):
                folds[valid] = fold
        return folds
    counts = np.bincount(labels)
    # Stratifying needs two images of every class present; otherwise fall back to a plain shuffle.
    stratify = labels if counts[counts > 0].min() >= 2 else None
    _, valid = train_test_split(np.arange(n), test_size=split.valid_fraction, random_state=split.seed, stratify=stratify)
    folds[valid] = 0
    return folds


def fold_count(folds: np.ndarray) -> int:
    return int(folds.max()) + 1
