"""What every trainer reads: the usable train images with labels and folds, the test splits, and
the per-image inputs besides features (the image-size one-hot, the geometry targets)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig
from fishcomp.console import warn
from fishcomp.context import resolve_device
from fishcomp.data.annotations import Annotations
from fishcomp.data.splits import assign_folds
from fishcomp.distributed import device_for
from fishcomp.features import POINT_COLUMNS, load_index, normalised_boxes, other_fish_boxes


def size_vocabulary(train_index: pd.DataFrame) -> list[str]:
    """The original sizes seen in train, most frequent first; any other size gets one extra slot."""
    return (train_index.width.astype(str) + "x" + train_index.height.astype(str)).value_counts().index.tolist()


def size_onehot(index: pd.DataFrame, vocabulary: list[str]) -> np.ndarray:
    slots = {size: i for i, size in enumerate(vocabulary)}
    keys = index.width.astype(str) + "x" + index.height.astype(str)
    onehot = np.zeros((len(index), len(vocabulary) + 1), dtype=np.float32)
    onehot[np.arange(len(index)), [slots.get(k, len(vocabulary)) for k in keys]] = 1.0
    return onehot


def geometry_targets(index: pd.DataFrame, head, annotations: Annotations | None = None) -> np.ndarray:
    """What the head regresses, as fractions of the image: the largest box, then head/tail points
    when the head predicts them, then (`box_targets: every`, from `annotations`) the photo's other
    fish's boxes, largest first, NaN-padded to the most any photo has (`split_geometry` reads it)."""
    parts = [normalised_boxes(index)]
    if getattr(head, "points_weight", None):
        parts.append(normalised_boxes(index, POINT_COLUMNS))
    if getattr(head, "box_targets", None) == "every" and annotations is not None:
        parts.append(other_fish_boxes(index, annotations).reshape(len(index), -1))
    return np.concatenate(parts, axis=1)


@dataclass
class TrainData:
    """What every trainer reads: the usable train images with labels and folds, and the test splits."""

    loaded: LoadedConfig
    meta: dict
    classes: list[str]
    index: pd.DataFrame  # the precompute index, every split
    usable: np.ndarray  # positions, in the train split, of the readable train images
    usable_index: pd.DataFrame  # their index rows
    labels: np.ndarray
    folds: np.ndarray
    vocabulary: list[str]  # image sizes seen in train (the leakage head's one-hot)
    test_splits: list[str]
    device: object


@dataclass
class FoldResult:
    valid_probs: np.ndarray
    valid_probs_original: np.ndarray  # without test-time augmentation
    valid_extras: dict[str, np.ndarray]  # "box", "points": what multi-output heads predict
    test_probs: dict[str, np.ndarray]
    test_extras: dict[str, dict[str, np.ndarray]]  # split -> the same
    kept_epoch: int
    checkpoint: dict | None
    # What predicts new rows where the checkpoint's module does not give the fit's own numbers
    # (a linear probe's fitted model), for a later build that reuses the fold (`EarlierFolds`).
    predictor: object = None


def prepare_training(loaded: LoadedConfig, features_artifact: Artifact) -> TrainData:
    config = loaded.config
    meta = json.loads(features_artifact.file("meta.json").read_text())
    classes = meta["classes"]
    index = load_index(features_artifact)
    train_index = index[index.split == "train"].reset_index(drop=True)
    usable = np.flatnonzero(train_index.ok.to_numpy())
    if len(usable) < len(train_index):
        warn(f"[{loaded.name}] {len(train_index) - len(usable)} unreadable train image(s) left out of training")
    labels = train_index.label.to_numpy()[usable]
    missing = [c for i, c in enumerate(classes) if not (labels == i).any()]
    if missing:
        warn(f"[{loaded.name}] no train images of {', '.join(missing)}: the model can only predict them from smoothing")
    usable_index = train_index.iloc[usable].reset_index(drop=True)
    folds = assign_folds(labels, config.split, groups=usable_index.width.astype(str) + "x" + usable_index.height.astype(str))
    return TrainData(
        loaded=loaded, meta=meta, classes=classes, index=index, usable=usable, usable_index=usable_index,
        labels=labels, folds=folds, vocabulary=size_vocabulary(usable_index),
        test_splits=[s for s in ("test_stg1", "test_stg2") if (index.split == s).any()],
        device=resolve_device(device_for(config.train.device)),
    )
