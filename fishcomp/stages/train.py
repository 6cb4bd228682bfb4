"""Stage 2: train a head on the cached features, fold by fold, and predict the test images.

Artifact (`<work>/train/<name>-<key>/`):
- `oof.csv`: image, label, fold, one probability column per class (empty for a never-validated
  image under a hold-out split); the out-of-fold predictions ensembles and clipping are tuned on;
- `test_stg1.csv` (and `test_stg2.csv`): image, probabilities (the folds' models averaged);
- `metrics.csv`: fold, epoch, lr, train_loss, valid_loss, valid_logloss, valid_accuracy;
- `checkpoints/fold<k>.pt`: the best epoch of each fold (by validation log loss);
- `summary.json`, `config.yaml`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, cache_key, dump_yaml, key_payload
from fishcomp.console import progress, stage_line, warn
from fishcomp.data.splits import assign_folds, fold_count
from fishcomp.distributed import data_parallel, device_for, ensure_together, gather_to_main, world
from fishcomp.errors import FishcompError
from fishcomp.metrics import accuracy, log_loss, prior_log_loss
from fishcomp.models.heads import head_uses_map
from fishcomp.models.losses import box_iou, head_loss, pointing_hits
from fishcomp.stages.context import Context, resolve_device
from fishcomp.stages.feature_sets import FeatureSet, concat, predict
from fishcomp.stages.precompute import (
    BOX_COLUMNS, POINT_COLUMNS, ensure_precompute, load_augmented, load_features, load_index, load_views, resolved_precompute,
)
from fishcomp.stages.predictions import Predictions, read_predictions

STAGE = "train"
# What multi-output heads predict besides classes, and the files they go to (fractions of the image).
GEOMETRY = {
    "box": ("boxes", BOX_COLUMNS),
    "points": ("points", POINT_COLUMNS),
}


def train_key(precompute_key: str, loaded: LoadedConfig, pseudo_key: str | None = None, whole_key: str | None = None) -> str:
    config = loaded.config
    parts = [precompute_key, key_payload(config.head), key_payload(config.train), key_payload(config.split)]
    if pseudo_key is not None:
        parts.append({"pseudo_source": pseudo_key})
    if _tta_combine(loaded):
        parts.append({"tta_combine": _tta_combine(loaded)})
    if whole_key is not None:
        parts.append({"nof": key_payload(config.crops.nof), "whole": whole_key})
    return cache_key(STAGE, *parts)


def _tta_combine(loaded: LoadedConfig) -> str | None:
    """How test-time views are combined, when the features have them (precompute.tta)."""
    tta = resolved_precompute(loaded).tta
    return tta.combine if tta is not None else None


def ensure_train(ctx: Context, loaded: LoadedConfig, _chain: tuple[Path, ...] = ()) -> Artifact:
    if not loaded.config.trains:
        raise FishcompError(f"{loaded.path}: nothing to train (add a `head:` section, or use an ensemble's members)")
    crops = loaded.config.crops
    if crops is not None:
        from fishcomp.stages.crops import ensure_crops

        features = ensure_crops(ctx, loaded)  # same layout as precompute's, so any pooled head reads it
    else:
        features = ensure_precompute(ctx, loaded)
    pseudo = _pseudo_source(ctx, loaded, _chain)
    whole = None
    if crops is not None and crops.nof is not None:
        whole = ensure_train(ctx, referenced_config(ctx, loaded, crops.nof.whole, "crops.nof.whole"), _chain + (loaded.path.resolve(),))
    key = train_key(features.key, loaded, pseudo.key if pseudo else None, whole.key if whole else None)
    # Under torchrun the folds are dealt to the ranks; rank 0 gathers them and publishes.
    artifact = ensure_together(ctx.cache, STAGE, loaded.name, key, lambda tmp: _build(ctx, loaded, features, tmp, pseudo, whole))
    summary = json.loads(artifact.file("summary.json").read_text())
    stage_line(
        STAGE, artifact.built, artifact.path,
        f"[{loaded.name}] valid logloss {summary['valid_logloss']:.4f}, accuracy {summary['valid_accuracy']:.3f}"
        + (f" (TTA x{summary['tta_views']}; {summary['valid_logloss_without_tta']:.4f} without)" if summary.get("tta_views", 1) > 1 else "")
        + (f" (crops alone {summary['nof_blend']['crops_alone']:.4f}, whole image {summary['nof_blend']['whole_image']:.4f})" if summary.get("nof_blend") else ""),
    )
    return artifact


def referenced_config(ctx: Context, loaded: LoadedConfig, relative: str, field: str, chain: tuple[Path, ...] = ()) -> LoadedConfig:
    """The config another one names (in `field`, e.g. train.pseudo.source; relative to the naming
    file), loaded with the user's model-section `--set` values (so a shrunken test run stays
    shrunken), except those of the section that names it, which belong to the naming run alone."""
    from fishcomp.config import MEMBER_SECTIONS, load_config

    path = loaded.path.parent / relative
    if path.resolve() in chain + (loaded.path.resolve(),):
        raise FishcompError(f"{loaded.path}: {field} {relative} leads back to itself")
    own_section = field.rsplit(".", 1)[0]
    overrides = [
        o for o in ctx.overrides
        if o.split(".", 1)[0].strip() in MEMBER_SECTIONS and not o.replace(" ", "").startswith(own_section)
    ]
    try:
        return load_config(path, overrides)
    except FishcompError as exc:
        raise FishcompError(f"{field} of {loaded.path}: {exc}") from exc


def _pseudo_source(ctx: Context, loaded: LoadedConfig, chain: tuple[Path, ...]) -> Artifact | None:
    """Build (or find) the run whose test predictions become this run's pseudo-labels."""
    settings = loaded.config.train.pseudo
    if settings is None:
        return None
    from fishcomp.stages.ensemble import ensure_ensemble

    source = referenced_config(ctx, loaded, settings.source, "train.pseudo.source", chain)
    here = loaded.path.resolve()
    if source.config.ensemble is not None:
        return ensure_ensemble(ctx, source, chain + (here,))
    if source.config.trains:
        return ensure_train(ctx, source, chain + (here,))
    raise FishcompError(f"{source.path}: a pseudo-label source must train a head or blend an ensemble")


def _pseudo_targets(source: Artifact, index: pd.DataFrame, splits: list[str], classes: list[str], where: str) -> dict[str, np.ndarray]:
    """The source's test probabilities, row-aligned with this run's test features."""
    predictions = read_predictions(source)
    if predictions.classes != list(classes):
        raise FishcompError(f"{where}: the pseudo-label source predicts classes {predictions.classes}, not {classes}")
    targets = {}
    for split in splits:
        images = index[index.split == split].image.reset_index(drop=True)
        if images.empty:
            raise FishcompError(f"{where}: train.pseudo.splits names {split}, but the data has no {split} images")
        frame = predictions.tests.get(split)
        if frame is None or not frame.image.reset_index(drop=True).equals(images):
            raise FishcompError(f"{where}: the pseudo-label source did not predict the same {split} images; rebuild it on this data")
        targets[split] = frame[classes].to_numpy(dtype=np.float32)
    return targets


def mixed_batches(n_train: int, n_pseudo: int, batch_size: int, proportion: float, rng: np.random.Generator):
    """The lesson's MixIterator: one epoch over the train positions in shuffled batches, each topped
    up with pseudo-labelled positions (cycled through, reshuffled on every pass) so that they make
    `proportion` of the batch. Yields (train positions, pseudo positions)."""
    pseudo_per_batch = min(batch_size - 1, max(1, round(batch_size * proportion))) if n_pseudo else 0
    train_per_batch = batch_size - pseudo_per_batch
    order = rng.permutation(n_train)
    pseudo_order, cursor = (rng.permutation(n_pseudo) if n_pseudo else np.empty(0, dtype=np.int64)), 0
    for start in range(0, n_train, train_per_batch):
        train_positions = order[start : start + train_per_batch]
        # Keep the mix at the stated proportion in a short last batch as well.
        wanted = round(len(train_positions) * pseudo_per_batch / train_per_batch) if n_pseudo else 0
        taken = []
        while wanted > 0:
            chunk = pseudo_order[cursor : cursor + wanted]
            taken.append(chunk)
            cursor += len(chunk)
            wanted -= len(chunk)
            if cursor >= n_pseudo:
                pseudo_order, cursor = rng.permutation(n_pseudo), 0
        yield train_positions, (np.concatenate(taken) if taken else np.empty(0, dtype=np.int64))


def batches_per_epoch(n_train: int, batch_size: int, pseudo) -> int:
    pseudo_per_batch = min(batch_size - 1, max(1, round(batch_size * pseudo.proportion))) if pseudo else 0
    return max(1, math.ceil(n_train / (batch_size - pseudo_per_batch)))


def _extra_scores(predicted: dict[str, np.ndarray], targets: np.ndarray | None) -> dict[str, float]:
    """Mean box IoU (bbox heads) and heatmap pointing score (class-map heads) on images with a box;
    mean head/tail distance (fractions of the image) on images with points."""
    if targets is None:
        return {}
    boxes = targets[:, :4]
    scores: dict[str, float] = {}
    if "points" in predicted and targets.shape[1] == 8:
        have_points = ~np.isnan(targets[:, 4:]).any(axis=1)
        if have_points.any():
            error = (predicted["points"][have_points] - targets[have_points, 4:]).reshape(-1, 2, 2)
            scores["valid_points_error"] = float(np.linalg.norm(error, axis=2).mean())
    have = ~np.isnan(boxes).any(axis=1)
    if not have.any():
        return scores
    if "box" in predicted:
        scores["valid_iou"] = float(box_iou(predicted["box"][have], boxes[have]).mean())
    if "heatmaps" in predicted:
        classes = predicted["probs"].argmax(axis=1)
        maps = predicted["heatmaps"][np.arange(len(classes)), classes]
        scores["valid_pointing"] = float(pointing_hits(maps[have], boxes[have]).mean())
    return scores


def lr_at(phase, step: int, steps: int, schedule: str) -> float:
    if schedule == "cosine":
        floor = phase.lr / 100
        return floor + (phase.lr - floor) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
    return phase.lr


def share_of_batch(positions: np.ndarray, pseudo_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This rank's part of a global batch (train then pseudo positions): every size-th item from
    its rank, so the ranks' parts make up exactly the batch a single process trains on."""
    here = world()
    mine = np.arange(here.rank, len(positions) + len(pseudo_positions), here.size)
    return positions[mine[mine < len(positions)]], pseudo_positions[mine[mine >= len(positions)] - len(positions)]


def _fit_fold(loaded, fold, train_set: FeatureSet, valid_set: FeatureSet, labels, valid_labels, num_classes, num_sizes, device, record, advance, pseudo=None, spread=False):
    """Train one fold's head, keeping the epoch with the best validation log loss.

    `pseudo`: (features of the pseudo-labelled test images, their soft targets) or None.
    `spread`: train on every rank with DistributedDataParallel, each rank taking its share of
    every batch and of the validation set; every rank ends with the same model.
    """
    import torch
    from torch import nn

    from fishcomp.distributed import sum_across, sync_buffers, wrap_data_parallel
    from fishcomp.models.heads import create_head

    config = loaded.config
    train_cfg = config.train
    here = world()
    torch.manual_seed(train_cfg.seed * 1000 + fold)
    # Every rank draws the same batches from this generator, and takes its own share of each.
    generator = np.random.default_rng([train_cfg.seed, fold])
    model = create_head(config.head, train_set.shape, num_classes, num_sizes=num_sizes).to(device)
    net = wrap_data_parallel(model, device) if spread else model
    if spread:
        torch.manual_seed(train_cfg.seed * 1000 + fold + 7919 * here.rank)  # own dropout masks per rank
    optimiser = torch.optim.Adam(model.parameters(), lr=train_cfg.phases[0].lr, weight_decay=train_cfg.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    train_labels = torch.from_numpy(labels)
    pseudo_set, pseudo_targets = pseudo if pseudo is not None else (None, None)
    batches = batches_per_epoch(len(train_set), train_cfg.batch_size, train_cfg.pseudo if pseudo else None)
    # BatchNorm cannot normalise a batch of one, on any rank.
    smallest_batch = 2 * here.size if spread else 2

    def train_epoch(phase, phase_epoch: int, epoch: int) -> float:
        net.train()
        mix = mixed_batches(
            len(train_set), len(pseudo_set) if pseudo_set is not None else 0, train_cfg.batch_size,
            train_cfg.pseudo.proportion if pseudo else 0.0, generator,
        )
        # One of the original and its augmented copies per image for this epoch.
        copy_choice = generator.integers(0, train_set.copy_count, size=len(train_set))
        total, seen = 0.0, 0
        for batch_index, (positions, pseudo_positions) in enumerate(mix):
            batch_items = len(positions) + len(pseudo_positions)
            if batch_items < smallest_batch and len(train_set) > 1:
                continue
            if spread:
                positions, pseudo_positions = share_of_batch(positions, pseudo_positions)
            for group in optimiser.param_groups:
                group["lr"] = lr_at(phase, phase_epoch * batches + batch_index, phase.epochs * batches, train_cfg.schedule)
            n, m = len(positions), len(pseudo_positions)
            inputs, sizes = [], []
            if n:
                x, size, box = train_set.batch(positions, device, copies=copy_choice[positions])
                inputs.append(x), sizes.append(size)
            if m:
                px, psize, _ = pseudo_set.batch(pseudo_positions, device)
                inputs.append(px), sizes.append(psize)
            # One forward pass over the mixed batch, so BatchNorm sees it whole.
            outputs = net(torch.cat(inputs) if len(inputs) > 1 else inputs[0], size=None if sizes[0] is None else torch.cat(sizes))
            if n:
                y = train_labels[positions].to(device)
                train_loss = head_loss({k: v[:n] for k, v in outputs.items()} if m else outputs, y, box, config.head, criterion)
            if m:
                pseudo_loss = criterion(outputs["logits"][n:], torch.from_numpy(pseudo_targets[pseudo_positions]).to(device))
            loss = pseudo_loss if not n else train_loss if not m else (n * train_loss + m * pseudo_loss) / (n + m)
            check_finite(loss, loaded.name, fold, epoch, "lower the learning rate (train.phases) or check the features for NaN")
            optimiser.zero_grad(set_to_none=True)
            # DistributedDataParallel averages the ranks' gradients; weighting each rank's mean by
            # its share of the batch makes that average the gradient of the whole batch's mean.
            (loss * (n + m) * here.size / batch_items if spread else loss).backward()
            optimiser.step()
            total += loss.item() * n
            seen += n
        total, seen = sum_across(total, seen) if spread else (total, seen)
        return total / max(seen, 1)

    def validate() -> dict:
        if spread:
            sync_buffers(model)
        predicted = predict_spread(model, valid_set, device) if spread else predict(model, valid_set, device)
        probs = predicted["probs"]
        # The training criterion on validation (log-probabilities are valid logits for it).
        log_probs = torch.log(torch.from_numpy(probs).clamp_min(1e-15))
        return {
            "valid_loss": float(criterion(log_probs, torch.from_numpy(valid_labels)).item()),
            "valid_logloss": log_loss(valid_labels, probs),
            "valid_accuracy": accuracy(valid_labels, probs),
            **_extra_scores(predicted, valid_set.boxes),
        }

    best_epoch = run_phases(train_cfg, fold, model, record, advance, train_epoch, validate)
    return model, best_epoch


def predict_spread(model, features: FeatureSet, device, tta: str | None = None) -> dict[str, np.ndarray]:
    """`predict`, each rank taking its share of the rows; every rank gets all of them."""
    from fishcomp.distributed import gather_rows, my_rows

    if len(features) < world().size:
        return predict(model, features, device, tta=tta)
    return gather_rows(predict(model, features.subset(my_rows(len(features))), device, tta=tta), len(features))


def check_finite(loss, name: str, fold: int, epoch: int, advice: str) -> None:
    """A NaN or infinite loss stops the run with one line (and, raised inside the build, keeps nothing)."""
    import torch

    if not torch.isfinite(loss):
        raise FishcompError(f"[{name}] fold {fold} epoch {epoch + 1}: loss is {loss.item()}; {advice}")


def run_phases(train_cfg, fold: int, model, records: list, advance, train_epoch, validate) -> int:
    """The loop every trainer shares: the config's phases, one record per epoch, early stopping on
    validation log loss, and the best epoch's weights restored at the end. Returns that epoch.

    `train_epoch(phase, phase_epoch, epoch)` trains one epoch and returns its mean loss;
    `validate()` returns the validation scores (with `valid_logloss`).
    """
    best = (np.inf, None, -1)
    epoch, stale = 0, 0
    for phase in train_cfg.phases:
        for phase_epoch in range(phase.epochs):
            if train_cfg.early_stopping and stale >= train_cfg.early_stopping:
                advance(1, note=f"fold {fold} stopped early")
                continue
            started = time.time()
            train_loss = train_epoch(phase, phase_epoch, epoch)
            scores = validate()
            epoch += 1
            records.append(
                {"fold": fold, "epoch": epoch, "lr": phase.lr, "train_loss": train_loss, **scores, "seconds": round(time.time() - started, 3)}
            )
            if scores["valid_logloss"] < best[0]:
                best, stale = (scores["valid_logloss"], copy.deepcopy(model.state_dict()), epoch), 0
            else:
                stale += 1
            advance(1, note=f"fold {fold} epoch {epoch} valid logloss {scores['valid_logloss']:.4f}")
    if best[1] is not None:
        model.load_state_dict(best[1])
    return best[2]


def size_vocabulary(train_index: pd.DataFrame) -> list[str]:
    """The original sizes seen in train, most frequent first; any other size gets one extra slot."""
    return (train_index.width.astype(str) + "x" + train_index.height.astype(str)).value_counts().index.tolist()


def size_onehot(index: pd.DataFrame, vocabulary: list[str]) -> np.ndarray:
    slots = {size: i for i, size in enumerate(vocabulary)}
    keys = index.width.astype(str) + "x" + index.height.astype(str)
    onehot = np.zeros((len(index), len(vocabulary) + 1), dtype=np.float32)
    onehot[np.arange(len(index)), [slots.get(k, len(vocabulary)) for k in keys]] = 1.0
    return onehot


def normalised_boxes(index: pd.DataFrame, columns: list[str] = BOX_COLUMNS) -> np.ndarray:
    """Boxes as (x, y, w, h) fractions of the image (or other x, y, x, y columns): the same numbers
    in any resized frame. NaN where the index has no such columns (features made before them)."""
    if not set(columns) <= set(index.columns):
        return np.full((len(index), 4), np.nan, dtype=np.float32)
    boxes = index[columns].to_numpy(dtype=np.float32)
    scale = index[["width", "height", "width", "height"]].to_numpy(dtype=np.float32)
    return boxes / np.where(scale > 0, scale, np.nan)


def geometry_targets(index: pd.DataFrame, head) -> np.ndarray:
    """What the head regresses: boxes, then head/tail points when the head predicts them too."""
    boxes = normalised_boxes(index)
    if getattr(head, "points_weight", None):
        return np.concatenate([boxes, normalised_boxes(index, POINT_COLUMNS)], axis=1)
    return boxes


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
    best_epoch: int
    checkpoint: dict


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


class CachedFeatureFolds:
    """Trains a head on the cached features, one fold at a time."""

    def __init__(self, data: TrainData, features_artifact: Artifact, pseudo_source: Artifact | None):
        loaded = data.loaded
        config = loaded.config
        self.data = data
        self.kind = "map" if head_uses_map(config.head) else "pooled"
        self.tta = _tta_combine(loaded)
        copies, copy_boxes = load_augmented(features_artifact, self.kind)
        self.train_features = FeatureSet(
            load_features(features_artifact, "train", self.kind), data.usable, size_onehot(data.usable_index, data.vocabulary),
            geometry_targets(data.usable_index, config.head), copies=copies, copy_boxes=None if copy_boxes is None else copy_boxes[:, data.usable],
            views=load_views(features_artifact, "train", self.kind),
        )
        self.test_features = {}
        for split in data.test_splits:
            array = load_features(features_artifact, split, self.kind)
            self.test_features[split] = FeatureSet(
                array, np.arange(len(array)), size_onehot(data.index[data.index.split == split], data.vocabulary),
                views=load_views(features_artifact, split, self.kind),
            )
        self.pseudo, self.pseudo_summary = None, None
        if pseudo_source is not None:
            settings = config.train.pseudo
            targets = _pseudo_targets(pseudo_source, data.index, settings.splits, data.classes, str(loaded.path))
            self.pseudo = concat([self.test_features[s] for s in settings.splits]), np.concatenate([targets[s] for s in settings.splits])
            self.pseudo_summary = {
                "source": pseudo_source.path.name, "source_key": pseudo_source.key, "splits": settings.splits,
                "images": int(len(self.pseudo[1])), "proportion": settings.proportion,
            }

    def fit(self, fold: int, train: np.ndarray, valid: np.ndarray, records: list, advance, spread: bool = False) -> FoldResult | None:
        data = self.data
        config = data.loaded.config
        valid_set = self.train_features.subset(valid)
        model, best_epoch = _fit_fold(
            data.loaded, fold, self.train_features.subset(train), valid_set, data.labels[train], data.labels[valid],
            len(data.classes), len(data.vocabulary) + 1, data.device, records, advance, self.pseudo, spread=spread,
        )
        if spread and not world().is_main:
            return None  # every rank holds the same model; rank 0 predicts (a head's pass is cheap)
        predicted = predict(model, valid_set, data.device, tta=self.tta)
        tests = {split: predict(model, self.test_features[split], data.device, tta=self.tta) for split in data.test_splits}
        return FoldResult(
            valid_probs=predicted["probs"], valid_probs_original=predicted.get("probs_original", predicted["probs"]),
            valid_extras={name: predicted[name] for name in GEOMETRY if name in predicted},
            test_probs={split: t["probs"] for split, t in tests.items()},
            test_extras={split: {name: t[name] for name in GEOMETRY if name in t} for split, t in tests.items()},
            best_epoch=best_epoch,
            checkpoint={
                "state_dict": model.state_dict(), "head": key_payload(config.head), "classes": data.classes,
                "in_shape": self.train_features.shape, "size_vocabulary": data.vocabulary,
            },
        )

    def summary(self) -> dict:
        return {
            "features": self.kind,
            "tta_views": self.train_features.view_count if self.tta else 1,
            "augment_copies": self.train_features.copy_count - 1,
            "pseudo": self.pseudo_summary,
        }


def make_trainer(ctx: Context, data: TrainData, features_artifact: Artifact, pseudo_source: Artifact | None = None):
    """The fold trainer for the config's head: cached features, or fine-tuning on images."""
    if data.loaded.config.head.kind == "finetune":
        from fishcomp.stages.finetune import FinetuneFolds

        return FinetuneFolds(data, ctx.dataset().root, features_artifact)
    return CachedFeatureFolds(data, features_artifact, pseudo_source)


def _build(ctx: Context, loaded: LoadedConfig, features_artifact: Artifact, tmp: Path, pseudo_source: Artifact | None = None, whole: Artifact | None = None) -> dict:
    import torch

    config = loaded.config
    data = prepare_training(loaded, features_artifact)
    trainer = make_trainer(ctx, data, features_artifact, pseudo_source)
    labels, folds, classes = data.labels, data.folds, data.classes
    n_folds = fold_count(folds)
    oof = np.full((len(labels), len(classes)), np.nan)
    oof_original = np.full((len(labels), len(classes)), np.nan)
    oof_extras = {name: np.full((len(labels), 4), np.nan) for name in GEOMETRY}
    test_probs: dict[str, list] = {split: [] for split in data.test_splits}
    test_extras: dict[str, dict[str, list]] = {name: {split: [] for split in data.test_splits} for name in GEOMETRY}
    records: list[dict] = []
    best_epochs = []
    here = world()
    # Under torchrun, either every fold trains on all ranks (data-parallel), or folds are dealt to
    # the ranks (fold f on rank f mod N: exactly the single-process result); rank 0 gathers them.
    spread = data_parallel(config.train.parallel, n_folds)
    mine = [fold for fold in range(n_folds) if spread or fold % here.size == here.rank]
    results = {}
    with progress(f"train {loaded.name}", len(mine) * config.train.epochs) as advance:
        for fold in mine:
            valid, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
            results[fold] = trainer.fit(fold, train, valid, records, advance, spread=spread)
    if spread and not here.is_main:
        return None
    if here.distributed and not spread:
        shares = gather_to_main((results, records))
        if not here.is_main:
            return None
        results, records = {}, []
        for other_results, other_records in shares:
            results.update(other_results)
            records += other_records
        records.sort(key=lambda r: (r["fold"], r["epoch"]))
    (tmp / "checkpoints").mkdir()
    for fold in range(n_folds):
        valid = np.flatnonzero(folds == fold)
        result = results[fold]
        best_epochs.append(result.best_epoch)
        oof[valid], oof_original[valid] = result.valid_probs, result.valid_probs_original
        for name, values in result.valid_extras.items():
            oof_extras[name][valid] = values
        for split in data.test_splits:
            test_probs[split].append(result.test_probs[split])
            for name, values in result.test_extras.get(split, {}).items():
                test_extras[name][split].append(values)
        torch.save(result.checkpoint, tmp / "checkpoints" / f"fold{fold}.pt")

    oof_frame = pd.DataFrame(oof, columns=classes)
    oof_frame.insert(0, "fold", folds)
    oof_frame.insert(0, "label", labels)
    oof_frame.insert(0, "image", data.usable_index.image.to_numpy())
    tests = {}
    prior = np.bincount(labels, minlength=len(classes)) + 1.0
    for split in data.test_splits:
        split_index = data.index[data.index.split == split]
        probs = np.mean(test_probs[split], axis=0)
        # An unreadable test image (allowed by --on-bad-test prior) gets the class prior, not a
        # prediction from the zeros that stand in for its features.
        probs[~split_index.ok.to_numpy(dtype=bool)] = prior / prior.sum()
        tests[split] = pd.DataFrame(probs, columns=classes)
        tests[split].insert(0, "image", split_index.image.to_numpy())
    extra = {}
    if whole is not None:
        extra["nof_blend"] = _blend_nof_with_whole(loaded, whole, oof_frame, tests, labels, folds >= 0)
        oof = oof_frame[classes].to_numpy()
    Predictions(classes=list(classes), oof=oof_frame, tests=tests).write(tmp)
    pd.DataFrame(records).to_csv(tmp / "metrics.csv", index=False)

    validated = folds >= 0
    for name, (stem, columns) in GEOMETRY.items():
        if any(test_extras[name].values()) or not np.isnan(oof_extras[name]).all():
            pd.DataFrame(oof_extras[name], columns=columns).assign(image=oof_frame.image).to_csv(tmp / f"oof_{stem}.csv", index=False)
            for split in data.test_splits:
                frame = pd.DataFrame(np.mean(test_extras[name][split], axis=0), columns=columns)
                frame.insert(0, "image", tests[split].image)
                frame.to_csv(tmp / f"{split}_{stem}.csv", index=False)
    metrics = pd.DataFrame(records)
    for score in ("valid_iou", "valid_pointing", "valid_points_error"):
        if score in metrics:
            # The score at each fold's best epoch, averaged over folds.
            per_fold = [metrics[(metrics.fold == f) & (metrics.epoch == e)][score].iloc[0] for f, e in enumerate(best_epochs)]
            extra[score] = float(np.mean(per_fold))
    summary = {
        "name": loaded.name,
        "head": config.head.kind,
        "input_size": data.meta["size"],
        "split": config.split.kind,
        "folds": n_folds,
        "train_images": int(len(labels)),
        "best_epochs": best_epochs,
        "valid_logloss": log_loss(labels[validated], oof[validated]),
        "valid_accuracy": accuracy(labels[validated], oof[validated]),
        "valid_logloss_without_tta": log_loss(labels[validated], oof_original[validated]),
        "prior_logloss": prior_log_loss(labels, labels[validated], len(classes)),
        **extra,
        **trainer.summary(),
        # The crops it trained on (detect-then-classify runs), for reports to find.
        **({"crops": {"artifact": features_artifact.path.name, "key": features_artifact.key}} if config.crops else {}),
        # Runtime facts (not in the key): how many processes trained it, and how they shared it.
        "processes": here.size,
        "parallel": ("data" if spread else "folds") if here.distributed else None,
        "size_vocabulary": data.vocabulary,
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / "config.yaml").write_text(dump_yaml(config.model_dump(mode="json")))
    return {"summary": summary}


def _blend_nof_with_whole(loaded: LoadedConfig, whole: Artifact, oof: pd.DataFrame, tests: dict, labels, validated) -> dict:
    """Blend the whole-image model's P(NoF) into the crop classifier's predictions, in place."""
    from fishcomp.stages.crops import blend_nof

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
    blended[validated] = blend_nof(blended[validated], whole_oof, settings.weight, nof)
    oof[classes] = blended
    for split, frame in tests.items():
        if split not in other.tests:
            raise FishcompError(f"crops.nof.whole of {loaded.path}: {whole.path.name} did not predict {split}; rebuild it on this data")
        frame[classes] = blend_nof(frame[classes].to_numpy(), aligned(other.tests[split], frame.image, split), settings.weight, nof)
    return {
        "whole": whole.path.name, "weight": settings.weight, "crops_alone": crops_alone,
        "whole_image": log_loss(labels[validated], whole_oof), "blended": log_loss(labels[validated], blended[validated]),
    }


def load_fold_model(artifact: Artifact, fold: int, device):
    """One fold's best head from a train artifact, rebuilt from its checkpoint, in eval mode."""
    import torch
    from pydantic import TypeAdapter

    from fishcomp.config import HeadConfig
    from fishcomp.models.heads import create_head

    path = artifact.file(f"checkpoints/fold{fold}.pt")
    if not path.is_file():
        raise FishcompError(f"{artifact.path} has no checkpoint for fold {fold}")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    head = TypeAdapter(HeadConfig).validate_python(checkpoint["head"])
    model = create_head(head, tuple(checkpoint["in_shape"]), len(checkpoint["classes"]), num_sizes=len(checkpoint["size_vocabulary"]) + 1)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()
