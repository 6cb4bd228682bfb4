"""Training a head fold by fold: the train stage's work, from features to predictions.

What it writes into the artifact folder:
- `oof.csv`: image, label, fold, one probability column per class (empty for a never-validated
  image under a hold-out split); the out-of-fold predictions ensembles and clipping are tuned on;
- `test_stg1.csv` (and `test_stg2.csv`): image, probabilities (the folds' models averaged);
- `metrics.csv`: fold, epoch, lr, train_loss, valid_loss, valid_logloss, valid_accuracy;
- `checkpoints/fold<k>.pt`: the best epoch of each fold (by validation log loss);
- `oof_boxes.csv` / `<split>_boxes.csv` (and `_points`) for heads that predict geometry;
- `summary.json` (and `config.yaml`, which the stage graph writes).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.blending import blend_nof_with_whole
from fishcomp.boxes import nearest_fish_iou
from fishcomp.cache import Artifact, resumed_seconds
from fishcomp.config import LoadedConfig, key_payload
from fishcomp.console import info, progress, warn
from fishcomp.context import Context, autocast, training_precision
from fishcomp.data.annotations import Annotations
from fishcomp.data.splits import fold_count
from fishcomp.distributed import data_parallel, gather_to_main, world
from fishcomp.errors import FishcompError
from fishcomp.faults import pause_point
from fishcomp.features import (
    GEOMETRY,
    load_augmented,
    load_features,
    load_views,
    tta_combine,
)
from fishcomp.metrics import accuracy, image_log_losses, log_loss, prior_log_loss
from fishcomp.models.heads import head_uses_map
from fishcomp.models.losses import class_map_boxes, head_loss, pointing_hits, split_geometry
from fishcomp.predictions import Predictions, read_predictions
from fishcomp.training.data import (
    FoldResult,
    TrainData,
    geometry_targets,
    prepare_training,
    size_onehot,
)
from fishcomp.training.candidates import CandidateRows, MixtureLoss, candidate_rows, has_candidates, mix_candidates
from fishcomp.training.feature_sets import FeatureSet, concat, predict, resident_budget, resident_dtype
from fishcomp.training.frozen_stem import FrozenStem
from fishcomp.training.loop import (
    batches_per_epoch,
    check_finite,
    first_epochs,
    lr_at,
    mixed_batches,
    predict_spread,
    run_phases,
    scaled_phases,
    share_of_batch,
    stopping_summary,
)


def pseudo_targets(source: Artifact, index: pd.DataFrame, splits: list[str], classes: list[str], where: str) -> dict[str, np.ndarray]:
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


def with_class_map_boxes(predicted: dict[str, np.ndarray], background: int | None) -> dict[str, np.ndarray]:
    """A class-map head's predictions with a box read off its heatmaps (`class_map_boxes`, chosen
    by the original view's probabilities, as the heatmaps are the original view's): a box
    source for crops, scored by box IoU like a box head's."""
    if "heatmaps" in predicted and "box" not in predicted:
        predicted["box"] = class_map_boxes(predicted["heatmaps"], predicted.get("probs_original", predicted["probs"]), background)
    return predicted


def _extra_scores(predicted: dict[str, np.ndarray], targets: np.ndarray | None, head_config) -> dict[str, float]:
    """Mean box IoU (bbox heads; against the nearest annotated fish when the targets hold every
    fish) and heatmap pointing score (class-map heads) on images with a box; mean head/tail
    distance (fractions of the image) on images with points."""
    if targets is None:
        return {}
    boxes, points, every_fish = split_geometry(targets, head_config)
    scores: dict[str, float] = {}
    if "points" in predicted and points is not None:
        have_points = ~np.isnan(points).any(axis=1)
        if have_points.any():
            error = (predicted["points"][have_points] - points[have_points]).reshape(-1, 2, 2)
            scores["valid_points_error"] = float(np.linalg.norm(error, axis=2).mean())
    have = ~np.isnan(boxes).any(axis=1)
    if not have.any():
        return scores
    if "box" in predicted:
        scores["valid_iou"] = float(nearest_fish_iou(predicted["box"][have], every_fish[have]).mean())
    if "heatmaps" in predicted:
        classes = predicted["probs"].argmax(axis=1)
        maps = predicted["heatmaps"][np.arange(len(classes)), classes]
        scores["valid_pointing"] = float(pointing_hits(maps[have], boxes[have]).mean())
    return scores


def _fit_fold(loaded, fold, train_set: FeatureSet, valid_set: FeatureSet, labels, valid_labels, num_classes, num_sizes, device, record, advance, pseudo=None, spread=False, background=None, base=None, epochs=None, held=None):
    """Train one fold's head; returns it with the epoch it keeps (`train.keep`: the last, or the
    one with the best validation log loss).

    `pseudo`: (features of the pseudo-labelled test images, their soft targets) or None.
    `spread`: train on every rank with DistributedDataParallel, each rank taking its share of
    every batch and of the validation set; every rank ends with the same model.
    `background`: the class (NoF) whose heatmap is not a fish's, for class-map boxes.
    `base`: the fold's fitted probe (`FoldProbe`) for a head with `head.base`, loaded before training.
    `epochs`: train only the schedule's first this-many epochs (0: none, the head as built).
    `held`: a list that gets each epoch's validation probabilities (per-image evidence).
    """
    import torch
    from torch import nn

    from fishcomp.distributed import sum_across, sync_buffers, wrap_data_parallel
    from fishcomp.models.heads import create_head

    config = loaded.config
    train_cfg = config.train
    here = world()
    dtype = training_precision(loaded, device)
    torch.manual_seed(train_cfg.seed * 1000 + fold)
    # Every rank draws the same batches from this generator, and takes its own share of each.
    generator = np.random.default_rng([train_cfg.seed, fold])
    model = create_head(config.head, train_set.shape, num_classes, num_sizes=num_sizes)
    if base is not None:
        model.base.load_state_dict(base.state_dict(num_classes))
    if train_set.boxes is not None and hasattr(model, "start_from_targets"):
        model.start_from_targets(train_set.boxes)
    model = model.to(device)
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
    # What the epochs read: the cached features, or once the stem is frozen, its outputs.
    sets = {"train": train_set, "valid": valid_set, "pseudo": pseudo_set}
    stem = None
    if train_cfg.stem_epochs is not None:
        # A saving, not a different model: where it cannot apply, every layer trains every epoch.
        stem = FrozenStem(model.stem(), device, dtype, resident_dtype(dtype, device))
        needed = stem.bytes_needed(sets)
        why_not = (
            "data-parallel training keeps the ranks' layers in step, not frozen mid-fold" if spread
            else f"its outputs ({needed / 2**30:.1f} GiB) would not fit in the memory map heads may hold" if needed > resident_budget()
            else None
        )
        if why_not:
            warn(f"train      [{loaded.name}] fold {fold}: every layer trains every epoch (train.stem_epochs ignored): {why_not}")
            stem = None

    def train_epoch(phase, phase_epoch: int, epoch: int) -> float:
        if stem is not None and epoch == train_cfg.stem_epochs:
            sets.update(stem.freeze(sets))
        train_set, pseudo_set = sets["train"], sets["pseudo"]
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
            with autocast(dtype, device):
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
        valid_set = sets["valid"]
        predicted = predict_spread(model, valid_set, device, dtype=dtype) if spread else predict(model, valid_set, device, dtype=dtype)
        predicted = with_class_map_boxes(predicted, background)
        probs = predicted["probs"]
        if held is not None:
            held.append(probs)
        # The training criterion on validation (log-probabilities are valid logits for it).
        log_probs = torch.log(torch.from_numpy(probs).clamp_min(1e-15))
        return {
            "valid_loss": float(criterion(log_probs, torch.from_numpy(valid_labels)).item()),
            "valid_logloss": log_loss(valid_labels, probs),
            "valid_accuracy": accuracy(valid_labels, probs),
            **_extra_scores(predicted, valid_set.boxes, loaded.config.head),
        }

    schedule = scaled_phases(train_cfg, batches)
    if epochs is not None:
        if epochs == 0:
            advance(schedule.epochs, note=f"fold {fold}: no epochs")
            return model, 0
        advance(schedule.epochs - min(epochs, schedule.epochs))  # the epochs left out
        schedule = first_epochs(schedule, epochs)
    try:
        kept_epoch = run_phases(schedule, fold, model, record, advance, train_epoch, validate)
    finally:
        if stem is not None:
            stem.release()
    return model, kept_epoch


def choose_dense_epochs(losses: list[np.ndarray], rule: str) -> tuple[int, int, np.ndarray]:
    """(the epochs kept, the epoch count with the lowest mean inner log loss, each count's mean)
    for dense layers on a probe (`head.base_choice`).

    `losses`: per inner split, the held images' log losses (epoch counts x images; row 0 the probe
    alone); a split that stopped early has fewer rows, and a count it never reached is scored on
    the others. one_se keeps the fewest epochs whose paired per-image difference from the lowest
    count is within one standard error of zero. An image held out by several repeats counts once
    per repeat, so the error is, if anything, too small: the rule errs towards the dense layers."""
    longest = max(len(split) for split in losses)
    scores = np.array([np.mean([split[e].mean() for split in losses if len(split) > e]) for e in range(longest)])
    lowest = int(np.argmin(scores))
    if rule == "one_se":
        for epochs in range(lowest):
            difference = np.concatenate([split[epochs] - split[lowest] for split in losses if len(split) > lowest])
            if len(difference) > 1 and difference.mean() <= difference.std(ddof=1) / np.sqrt(len(difference)):
                return epochs, lowest, scores
    return lowest, lowest, scores


def inner_split(train: np.ndarray, valid: np.ndarray, train_cfg, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to fit on, rows that choose the epoch): with `inner_valid`, a seeded share of the
    fold's own training rows chooses, so its validation rows stay unseen until prediction."""
    if not train_cfg.inner_valid or len(train) < 10:
        return train, valid
    order = np.random.default_rng([train_cfg.seed, fold, 31]).permutation(train)
    held = max(2, round(len(order) * train_cfg.inner_valid))
    return np.sort(order[held:]), np.sort(order[:held])


class CachedFeatureFolds:
    """Trains a head on the cached features, one fold at a time."""

    def __init__(self, data: TrainData, features_artifact: Artifact, pseudo_source: Artifact | None, annotations: Annotations | None = None,
                 candidates: CandidateRows | None = None, held_loss=None):
        """`annotations`: every fish's box, for a grid locator taught to find them all
        (`head.box_targets: every`); the precompute index holds only the largest. `candidates`:
        the further crops that train with their photos (`crops.candidates.train`). `held_loss`:
        how the probe under `head.base` scores a strength on its inner split (`fit_fold_probe`)."""
        loaded = data.loaded
        config = loaded.config
        self.data = data
        self.kind = "map" if head_uses_map(config.head) else "pooled"
        self.tta = tta_combine(loaded)
        # NoF's map marks the empty deck, not a fish (as in blending's NoF handling).
        self.background = data.classes.index("NoF") if "NoF" in data.classes else None
        copies, copy_boxes = load_augmented(features_artifact, self.kind)
        self.train_features = FeatureSet(
            load_features(features_artifact, "train", self.kind), data.usable, size_onehot(data.usable_index, data.vocabulary),
            geometry_targets(data.usable_index, config.head, annotations), copies=copies, copy_boxes=None if copy_boxes is None else copy_boxes[:, data.usable],
            views=load_views(features_artifact, "train", self.kind),
        )
        if config.head.kind == "bbox" and np.isnan(self.train_features.boxes[:, :4]).all():
            warn(f"train      [{loaded.name}] no train image has a box (no *_labels.json in the data's annos/ folder): "
                 "its box output learns nothing, and crops cut around its boxes would be cut blind")
        self.test_features = {}
        for split in data.test_splits:
            array = load_features(features_artifact, split, self.kind)
            self.test_features[split] = FeatureSet(
                array, np.arange(len(array)), size_onehot(data.index[data.index.split == split], data.vocabulary),
                views=load_views(features_artifact, split, self.kind),
            )
        self.projection, self.probe_rows = None, None
        if self.kind == "map" and config.train.map_channels:
            self._project_maps(config.train.map_channels, config.train.seed)
        if config.train.mirror_copies:
            self.train_features.add_mirrored_copies(points=bool(getattr(config.head, "points_weight", None)))
        # `crops.candidates.train`: the training photos' further crops, as more rows after the
        # photos' own (`self.labels` covers both; a fold trains on its own photos' crops).
        self.labels, self.candidates, self.held_loss = data.labels, candidates, held_loss
        if candidates is not None:
            train, extra = self.train_features, self.candidates
            self.train_features = train.with_rows(
                extra.features, None if train.sizes is None else train.sizes[extra.owner], extra.copies(len(train.copies)),
                [extra.features if extra.mirrored is None else extra.mirrored] * len(train.views),
            )
            self.labels = np.concatenate([data.labels, extra.labels])
        self.pseudo, self.pseudo_summary = None, None
        if pseudo_source is not None:
            settings = config.train.pseudo
            targets = pseudo_targets(pseudo_source, data.index, settings.splits, data.classes, str(loaded.path))
            self.pseudo = concat([self.test_features[s] for s in settings.splits]), np.concatenate([targets[s] for s in settings.splits])
            self.pseudo_summary = {
                "source": pseudo_source.path.name, "source_key": pseudo_source.key, "splits": settings.splits,
                "images": int(len(self.pseudo[1])), "proportion": settings.proportion,
            }
        if self.kind == "map":
            # Read once into memory in the layout and type each step wants (see ResidentMaps),
            # the training images first, as far as the budget goes.
            held_as, budget = resident_dtype(training_precision(loaded, data.device), data.device), resident_budget()
            for features in (self.train_features, *self.test_features.values(), *([self.pseudo[0]] if self.pseudo else [])):
                budget -= features.make_resident(held_as, budget)

    def _project_maps(self, channels: int, seed: int) -> None:
        """Every map this run reads (train, its copies and views, the test splits), projected once
        onto the train maps' first `channels` whitened principal components, held in memory."""
        from fishcomp.training.map_projection import fit_projection, project

        train = self.train_features
        mean, components = fit_projection(train.array, train.rows, channels, seed)
        self.projection = {"mean": mean, "components": components}

        for features in (train, *self.test_features.values()):
            features.array = project(features.array, mean, components)
            features.copies = [project(c, mean, components) for c in features.copies]
            features.views = [project(v, mean, components) for v in features.views]

    def fit(self, fold: int, train: np.ndarray, valid: np.ndarray, records: list, advance, spread: bool = False) -> FoldResult | None:
        import torch

        data = self.data
        config = data.loaded.config
        valid_set = self.train_features.subset(valid)
        fit_rows, chooser = inner_split(train, valid, config.train, fold)
        fitted = self._widen(fit_rows)
        base, epochs = None, None
        if getattr(config.head, "base", None) is not None:
            base, epochs = self._fit_base(fold, fit_rows, records, spread)
        model, kept_epoch = _fit_fold(
            data.loaded, fold, self.train_features.subset(fitted), self.train_features.subset(chooser), self.labels[fitted],
            data.labels[chooser], len(data.classes), len(data.vocabulary) + 1, data.device, records, advance, self.pseudo, spread=spread,
            background=self.background, base=base, epochs=epochs,
        )
        if spread and not world().is_main:
            return None  # every rank holds the same model; rank 0 predicts (a head's pass is cheap)
        dtype = training_precision(data.loaded, data.device)
        predicted = with_class_map_boxes(predict(model, valid_set, data.device, tta=self.tta, dtype=dtype), self.background)
        if epochs == 0:
            self._score_probe_fold(fold, predicted, valid_set, records)
        test_probs, test_extras = self._predict_tests(model)
        return FoldResult(
            valid_probs=predicted["probs"], valid_probs_original=predicted.get("probs_original", predicted["probs"]),
            valid_extras={name: predicted[name] for name in (*GEOMETRY, "cells") if name in predicted},
            test_probs=test_probs, test_extras=test_extras,
            kept_epoch=kept_epoch,
            checkpoint={
                "state_dict": model.state_dict(), "head": key_payload(config.head), "classes": data.classes,
                "in_shape": self.train_features.shape, "size_vocabulary": data.vocabulary,
                **({"projection": {k: torch.from_numpy(v) for k, v in self.projection.items()}} if self.projection else {}),
            },
        )

    def _predict_tests(self, model) -> tuple[dict, dict]:
        """A fold model's test predictions: (split -> probabilities, split -> boxes and the like)."""
        data = self.data
        dtype = training_precision(data.loaded, data.device)
        tests = {
            split: with_class_map_boxes(predict(model, self.test_features[split], data.device, tta=self.tta, dtype=dtype), self.background)
            for split in data.test_splits
        }
        return {split: t["probs"] for split, t in tests.items()}, {split: {name: t[name] for name in (*GEOMETRY, "cells") if name in t} for split, t in tests.items()}

    def predict_tests(self, result: FoldResult) -> tuple[dict, dict]:
        """`_predict_tests` of a fold model from its checkpoint (the test maps here are projected
        already where the head trained on projected maps: the bare head reads them)."""
        return self._predict_tests(model_from_checkpoint(result.checkpoint, self.data.device, projected=False))

    def _fit_base(self, fold: int, positions: np.ndarray, records: list, spread: bool):
        """(the probe under a head with `head.base`, how many epochs the dense layers train on it).

        Both are chosen on the probe's inner splits of these training positions, never on the
        fold's validation images: the probe's strength, then the epoch count, 0 to the schedule's
        length, of the dense layers on the inner probes, by their log loss on the held images
        (`head.base_choice`; 0: they do not help, the head is the probe). The probe is fitted on
        each image and its augmented copies, as the head trains on them. `metrics.csv` gets the
        choice as epoch-0 rows (`strength`, `inner_logloss`, and on the chosen strength's row
        `dense_epochs`, `dense_inner_logloss`, and the lowest count's `dense_lowest_epochs`,
        `dense_lowest_inner_logloss`)."""
        from fishcomp.training.linear import ProbeRows, fit_fold_probe

        data, features = self.data, self.train_features
        if self.probe_rows is None:  # every fold's probe reads the same rows
            # Copies of the photos only: rows widened in come once (ProbeRows).
            photos = features.rows[: len(data.labels)]
            self.probe_rows = ProbeRows(features.array[features.rows], [c[photos] for c in features.copies], self.labels, widen=self._widen)
        tried: list = []
        probe = fit_fold_probe(self.probe_rows, positions, data.loaded.config.head.base, data.loaded.config.train.seed, fold,
                               len(data.classes), tried, time.time(), self.held_loss)
        losses = []
        for inner in probe.inner:
            held: list = []
            fitted = self._widen(inner.train)
            _fit_fold(
                data.loaded, fold, features.subset(fitted), features.subset(inner.valid), self.labels[fitted],
                data.labels[inner.valid], len(data.classes), len(data.vocabulary) + 1, data.device, [], lambda *_, **__: None,
                self.pseudo, spread=spread, base=inner.probe, held=held,
            )
            labels = data.labels[inner.valid]
            alone = inner.probe.predict(self.probe_rows.originals[inner.valid], len(data.classes))
            losses.append(np.stack([image_log_losses(labels, probs) for probs in (alone, *held)]))
        epochs, lowest, scores = choose_dense_epochs(losses, data.loaded.config.head.base_choice or "lowest")
        # Not `converged` rows: those mark a probe's own artifact (stopping_summary).
        for r in tried:
            chosen = r["strength"] == probe.strength and not r.get("repeat")  # marked once per fold
            records.append({"fold": fold, "epoch": 0, "lr": r["strength"], "strength": r["strength"], "inner_logloss": r["inner_logloss"],
                            "chosen": chosen, "seconds": r["seconds"], **({"repeat": r["repeat"]} if "repeat" in r else {}),
                            **({"refit_strength": probe.refit_strength} if chosen and probe.refit_strength else {}),
                            **({"dense_epochs": epochs, "dense_inner_logloss": float(scores[epochs]),
                                "dense_lowest_epochs": lowest, "dense_lowest_inner_logloss": float(scores[lowest])} if chosen else {})})
        return probe, epochs

    def _widen(self, positions: np.ndarray) -> np.ndarray:
        """Training photos' positions, with their further crops' rows where they train too."""
        return positions if self.candidates is None else self.candidates.widen(positions)

    def _score_probe_fold(self, fold: int, predicted: dict, valid_set: FeatureSet, records: list) -> None:
        """A fold whose inner split chose 0 epochs on its probe has no epoch row for its box IoU
        (and the like): they go on its chosen-strength row, the row its kept epoch 0 points at.
        Its other outputs (a bbox head's box) never trained, which is said, not hidden."""
        scores = _extra_scores(predicted, valid_set.boxes, self.data.loaded.config.head)
        next(r for r in reversed(records) if r["fold"] == fold and r.get("chosen")).update(scores)
        untrained = [name for name in ("box", "points") if name in predicted]
        if untrained:
            warn(f"train      [{self.data.loaded.name}] fold {fold}: its inner split chose 0 epochs on the probe, "
                 f"so its {' and '.join(untrained)} output{'s' if len(untrained) > 1 else ''} never trained"
                 + (f" (out-of-fold IoU {scores['valid_iou']:.3f})" if "valid_iou" in scores else ""))

    def summary(self) -> dict:
        return {
            "features": self.kind,
            "tta_views": self.train_features.view_count if self.tta else 1,
            "augment_copies": self.train_features.copy_count - 1,
            "pseudo": self.pseudo_summary,
            **({"candidate_crops_trained": self.candidates.counts} if self.candidates is not None else {}),
        }


class FoldStore:
    """Finished folds of an unfinished train artifact, in `.resume-<label>-<key>/` beside its
    temporary folder (which an interrupt removes). Same key, same config: a fold found here is
    exactly the fold a fresh run would train (each fold seeds itself from (seed, fold))."""

    def __init__(self, tmp: Path):
        self.folder = tmp.parent / tmp.name.replace(".tmp-", ".resume-", 1)

    def has(self, fold: int) -> bool:
        return (self.folder / f"fold{fold}.pt").is_file()

    def load(self, fold: int):
        import torch

        path = self.folder / f"fold{fold}.pt"
        if not path.is_file():
            return None
        try:
            kept = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written below
        except Exception:  # a fold file cut short by the interrupt: train that fold again
            return None
        return kept["result"], kept["records"], float(kept.get("seconds", 0.0))

    def save(self, fold: int, result, records: list, seconds: float) -> None:
        import torch

        from fishcomp.cache import write_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"result": result, "records": records, "seconds": seconds}, buffer)
        write_atomic(self.folder / f"fold{fold}.pt", buffer.getvalue())

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


# In a train artifact: each fold's out-of-fold part (`FoldResult` without its checkpoint, which is
# in checkpoints/, and without test predictions), its metrics rows and seconds.
FOLDS_DIR = "folds"


def save_fold_parts(tmp: Path, results: dict, records: list, seconds: dict) -> None:
    import dataclasses

    import torch

    (tmp / FOLDS_DIR).mkdir()
    for fold, result in results.items():
        part = dataclasses.replace(result, checkpoint=None, test_probs={}, test_extras={})
        torch.save({"result": part, "records": [r for r in records if r["fold"] == fold], "seconds": seconds.get(fold, 0.0)},
                   tmp / FOLDS_DIR / f"fold{fold}.pt")


class EarlierFolds:
    """The fold models of a finished train artifact with the same fit key (`Stage.fit_params`):
    the same train images, features, settings and inputs, built for other test images. A fold
    taken from it is that artifact's fold (its model, its out-of-fold predictions and metrics),
    with the test images predicted anew by its model: stage 2's photos are predicted by the very
    models stage 1's submission came from, without training them again."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact

    def has(self, fold: int) -> bool:
        return self.artifact.file(f"{FOLDS_DIR}/fold{fold}.pt").is_file() and self.artifact.file(f"checkpoints/fold{fold}.pt").is_file()

    def load(self, fold: int, trainer):
        import torch

        kept = torch.load(self.artifact.file(f"{FOLDS_DIR}/fold{fold}.pt"), map_location="cpu", weights_only=False)  # our own file
        result = kept["result"]
        result.checkpoint = torch.load(self.artifact.file(f"checkpoints/fold{fold}.pt"), map_location="cpu", weights_only=True)
        result.test_probs, result.test_extras = trainer.predict_tests(result)
        return result, kept["records"]


def make_trainer(ctx: Context, data: TrainData, features_artifact: Artifact, pseudo_source: Artifact | None = None):
    """The fold trainer for the config's head: cached features, or fine-tuning on images."""
    if data.loaded.config.train.finetune is not None:
        from fishcomp.training.finetune import FinetuneFolds

        return FinetuneFolds(data, ctx.dataset().root, features_artifact)
    config = data.loaded.config
    every_fish = getattr(config.head, "box_targets", None) == "every"
    trains_on_candidates = config.crops is not None and config.crops.candidates is not None and bool(config.crops.candidates.train)
    annotations = ctx.annotations(config.data) if every_fish or trains_on_candidates else None
    candidates = candidate_rows(data, features_artifact, annotations) if trains_on_candidates else None
    held_loss = None
    if config.crops is not None and config.crops.candidates is not None and config.crops.candidates.inner == "mixture":
        if config.head.kind != "linear" and getattr(config.head, "base", None) is None:
            raise FishcompError(f"{data.loaded.path}: crops.candidates.inner: mixture chooses a probe's strength, and head.kind "
                                f"{config.head.kind} has none: use head.kind linear or a head.base")
        if not has_candidates(features_artifact):
            raise FishcompError(f"{features_artifact.path} holds no further crops: set crops.candidates.count and rebuild it for crops.candidates.inner")
        held_loss = MixtureLoss.from_artifact(data, features_artifact)
    if config.head.kind == "linear":
        from fishcomp.training.linear import LinearProbeFolds

        if pseudo_source is not None:
            raise FishcompError(f"{data.loaded.path}: train.pseudo works with heads trained by gradient steps, not the linear probe")
        return LinearProbeFolds(data, features_artifact, candidates, held_loss)
    return CachedFeatureFolds(data, features_artifact, pseudo_source, annotations if every_fish else None, candidates, held_loss)


def fit_folds(ctx: Context, loaded: LoadedConfig, features_artifact: Artifact, tmp: Path, pseudo_source: Artifact | None = None, whole: Artifact | None = None,
              earlier: Artifact | None = None) -> dict:
    """Train every fold (under torchrun: folds dealt to the ranks, or each fold on all of them), predict, and write the artifact's files into `tmp`.
    `earlier`: a train artifact of the same fit key, whose folds are taken instead of trained (`EarlierFolds`)."""
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
    test_extras: dict[str, dict[str, list]] = {name: {split: [] for split in data.test_splits} for name in (*GEOMETRY, "cells")}
    oof_cells = None  # the grid locator's cell map, (images, 5, h, w): see GridLocator.cell_map
    records: list[dict] = []
    kept_epochs = []
    here = world()
    # Under torchrun, either every fold trains on all ranks (data-parallel), or folds are dealt to
    # the ranks (fold f on rank f mod N: exactly the single-process result); rank 0 gathers them.
    spread = data_parallel(config.train.parallel, n_folds)
    mine = [fold for fold in range(n_folds) if spread or fold % here.size == here.rank]
    results = {}
    # Finished folds are kept beside the unfinished artifact, so a stopped run (Ctrl-C, a time
    # limit, a pre-empted machine) resumes at the first missing fold with the same result.
    resume = FoldStore(tmp)
    kept_folds = [fold for fold in mine if resume.has(fold)]
    if kept_folds:
        info(f"train      [{loaded.name}] resuming: fold(s) {', '.join(map(str, kept_folds))} kept from the stopped run")
    seconds_before_resume = 0.0  # the kept folds' training time: the artifact's build time counts it
    fold_seconds: dict[int, float] = {}
    reused = EarlierFolds(earlier) if earlier is not None and not spread else None
    reused_folds = [fold for fold in mine if reused is not None and not resume.has(fold) and reused.has(fold)]
    if reused_folds:
        info(f"train      [{loaded.name}] reusing fold model(s) {', '.join(map(str, reused_folds))} of {earlier.path.name} "
             "(the same train images, features and settings): only the test images are predicted")
    with progress(f"train {loaded.name}", len(mine) * config.train.epochs) as advance:
        for fold in mine:
            kept = resume.load(fold)
            if kept is not None:
                results[fold], fold_records, fold_seconds[fold] = kept
                records += fold_records
                seconds_before_resume += fold_seconds[fold]
                advance(config.train.epochs, note=f"fold {fold} kept from the stopped run")
                continue
            if fold in reused_folds:
                results[fold], fold_records = reused.load(fold, trainer)
                records += fold_records
                advance(config.train.epochs, note=f"fold {fold} reused")
                continue
            valid, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
            before, started = len(records), time.time()
            results[fold] = trainer.fit(fold, train, valid, records, advance, spread=spread)
            fold_seconds[fold] = time.time() - started
            if here.is_main or not spread:
                resume.save(fold, results[fold], records[before:], fold_seconds[fold])
            pause_point("train.fold")
    if spread and not here.is_main:
        return None
    if here.distributed and not spread:
        shares = gather_to_main((results, records, fold_seconds))
        if not here.is_main:
            return None
        results, records = {}, []
        for other_results, other_records, other_seconds in shares:
            results.update(other_results)
            records += other_records
            fold_seconds.update(other_seconds)
        records.sort(key=lambda r: (r["fold"], r["epoch"]))
    # Before the candidates' mixture replaces the folds' predictions in place: a build that takes
    # these folds mixes them itself.
    save_fold_parts(tmp, results, records, fold_seconds)
    extra = {}
    if config.crops is not None and config.crops.candidates is not None and has_candidates(features_artifact):
        extra["candidates"], crop_shares = mix_candidates(data, features_artifact, results, lambda fold: model_from_checkpoint(results[fold].checkpoint, data.device))
        # What `fishcomp report` draws: how much each crop weighed in each photo's mixture.
        np.save(tmp / "oof_candidate_shares.npy", crop_shares)
    (tmp / "checkpoints").mkdir()
    for fold in range(n_folds):
        valid = np.flatnonzero(folds == fold)
        result = results[fold]
        kept_epochs.append(result.kept_epoch)
        oof[valid], oof_original[valid] = result.valid_probs, result.valid_probs_original
        for name, values in result.valid_extras.items():
            if name == "cells":
                oof_cells = np.full((len(labels), *values.shape[1:]), np.nan, np.float32) if oof_cells is None else oof_cells
                oof_cells[valid] = values
            else:
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
    tests, test_folds = {}, {}
    prior = np.bincount(labels, minlength=len(classes)) + 1.0
    for split in data.test_splits:
        split_index = data.index[data.index.split == split]
        test_folds[split] = np.stack(test_probs[split]).astype(np.float64)
        # An unreadable test image (allowed by --on-bad-test prior) gets the class prior, not a
        # prediction from the zeros that stand in for its features.
        test_folds[split][:, ~split_index.ok.to_numpy(dtype=bool)] = prior / prior.sum()
        tests[split] = pd.DataFrame(test_folds[split].mean(axis=0), columns=classes)
        tests[split].insert(0, "image", split_index.image.to_numpy())
    if whole is not None:
        extra["nof_blend"] = blend_nof_with_whole(loaded, whole, oof_frame, tests, labels, folds >= 0, test_folds)
        oof = oof_frame[classes].to_numpy()
    # With one fold (a hold-out split) the test predictions are that model's own: nothing to keep.
    fold_copies = test_folds if n_folds > 1 else {}
    Predictions(classes=list(classes), oof=oof_frame, tests=tests, test_folds=fold_copies).write(tmp)
    pd.DataFrame(records).to_csv(tmp / "metrics.csv", index=False)

    validated = folds >= 0
    for name, (stem, columns) in GEOMETRY.items():
        if any(test_extras[name].values()) or not np.isnan(oof_extras[name]).all():
            pd.DataFrame(oof_extras[name], columns=columns).assign(image=oof_frame.image).to_csv(tmp / f"oof_{stem}.csv", index=False)
            for split in data.test_splits:
                frame = pd.DataFrame(np.mean(test_extras[name][split], axis=0), columns=columns)
                frame.insert(0, "image", tests[split].image)
                frame.to_csv(tmp / f"{split}_{stem}.csv", index=False)
                # Each fold model's own, in fold order (rows as in the CSV): where the folds
                # disagree, their mean can lie between two fish (crops' `test_boxes`).
                np.save(tmp / f"{split}_{stem}_folds.npy", np.stack(test_extras[name][split]).astype(np.float32))
    if oof_cells is not None:
        # Where the box source would look next: the crops' further candidates (`crops.candidates`).
        np.save(tmp / "oof_cells.npy", oof_cells)
        for split in data.test_splits:
            np.save(tmp / f"{split}_cells.npy", np.mean(test_extras["cells"][split], axis=0).astype(np.float32))
    metrics = pd.DataFrame(records)
    for score in ("valid_iou", "valid_pointing", "valid_points_error"):
        if score in metrics:
            # The score at each fold's kept epoch, averaged over folds.
            at_kept = [metrics[(metrics.fold == f) & (metrics.epoch == e)][score].dropna() for f, e in enumerate(kept_epochs)]
            extra[score] = float(np.mean([values.iloc[0] if len(values) else np.nan for values in at_kept]))
    summary = {
        "name": loaded.name,
        "head": config.head.kind,
        "input_size": data.meta["size"],
        "split": config.split.kind,
        "folds": n_folds,
        "train_images": int(len(labels)),
        "kept_epochs": kept_epochs,
        # Whether each fold stopped because it converged or because it ran out of epochs.
        **stopping_summary(pd.DataFrame(records), kept_epochs),
        "epochs_chosen_on": (
            "none: each fold keeps its last epoch" if config.train.keep == "last"
            else "inner split of each fold's training images" if config.train.inner_valid else "the validation fold"
        ),
        "valid_logloss": log_loss(labels[validated], oof[validated]),
        "valid_accuracy": accuracy(labels[validated], oof[validated]),
        "valid_logloss_without_tta": log_loss(labels[validated], oof_original[validated]),
        "prior_logloss": prior_log_loss(labels, labels[validated], len(classes)),
        **extra,
        **trainer.summary(),
        # The artifacts it read, for reports (and `fishcomp runs`) to find.
        "inputs": {
            "features": {"stage": features_artifact.stage, "artifact": features_artifact.path.name, "key": features_artifact.key},
            **({"pseudo": {"stage": pseudo_source.stage, "artifact": pseudo_source.path.name, "key": pseudo_source.key}} if pseudo_source else {}),
            **({"whole": {"stage": whole.stage, "artifact": whole.path.name, "key": whole.key}} if whole else {}),
        },
        # Runtime facts (not in the key): how many processes trained it, and how they shared it.
        "processes": here.size,
        "parallel": ("data" if spread else "folds") if here.distributed else None,
        "size_vocabulary": data.vocabulary,
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    taken = {"reused": {"from": earlier.path.name, "folds": reused_folds}} if reused_folds else {}
    return {"summary": summary, **resumed_seconds(seconds_before_resume), **taken}


def load_fold_model(artifact: Artifact, fold: int, device):
    """One fold's best head from a train artifact, rebuilt from its checkpoint, in eval mode."""
    import torch

    path = artifact.file(f"checkpoints/fold{fold}.pt")
    if not path.is_file():
        raise FishcompError(f"{artifact.path} has no checkpoint for fold {fold}")
    return model_from_checkpoint(torch.load(path, map_location=device, weights_only=True), device)


def model_from_checkpoint(checkpoint: dict, device, projected: bool = True):
    """A fold's head rebuilt from its checkpoint's contents, in eval mode; with the map projection
    it trained behind in front of it, unless not `projected` (for maps projected already)."""
    from pydantic import TypeAdapter

    from fishcomp.config import HeadConfig
    from fishcomp.models.heads import create_head

    fields = dict(checkpoint["head"])
    if fields.get("kind") == "dense":
        # A dense head saved before `input_floor` existed was trained and evaluated with the plain norm.
        fields.setdefault("input_floor", None)
    head = TypeAdapter(HeadConfig).validate_python(fields)
    model = create_head(head, tuple(checkpoint["in_shape"]), len(checkpoint["classes"]), num_sizes=len(checkpoint["size_vocabulary"]) + 1)
    model.load_state_dict(checkpoint["state_dict"])
    if "projection" in checkpoint and projected:  # trained on projected maps: the projection goes in front
        from fishcomp.training.map_projection import projected_head

        projection = checkpoint["projection"]
        model = projected_head(model, projection["mean"].cpu().numpy(), projection["components"].cpu().numpy())
    return model.to(device).eval()
