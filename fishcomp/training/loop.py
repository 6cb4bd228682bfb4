"""The epoch loop every trainer shares, read top to bottom: batches (with pseudo-labels mixed
in), the learning-rate schedule, the phases with early stopping and the best epoch kept."""

from __future__ import annotations

import copy
import math
import time

import numpy as np

from fishcomp.distributed import world
from fishcomp.errors import FishcompError
from fishcomp.training.feature_sets import FeatureSet, predict


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


def predict_spread(model, features: FeatureSet, device, tta: str | None = None, dtype=None) -> dict[str, np.ndarray]:
    """`predict`, each rank taking its share of the rows; every rank gets all of them."""
    from fishcomp.distributed import gather_rows, my_rows

    if len(features) < world().size:
        return predict(model, features, device, tta=tta, dtype=dtype)
    return gather_rows(predict(model, features.subset(my_rows(len(features))), device, tta=tta, dtype=dtype), len(features))


def check_finite(loss, name: str, fold: int, epoch: int, advice: str) -> None:
    """A NaN or infinite loss stops the run with one line (and, raised inside the build, keeps nothing)."""
    import torch

    if not torch.isfinite(loss):
        raise FishcompError(f"[{name}] fold {fold} epoch {epoch + 1}: loss is {loss.item()}; {advice}")


def run_phases(train_cfg, fold: int, model, records: list, advance, train_epoch, validate) -> int:
    """The loop every trainer shares: the config's phases, one record per epoch, early stopping on
    validation log loss, and at the end the best epoch's weights restored (`train.keep: best`) or
    the last epoch's kept (`last`). Returns the kept epoch.

    `train_epoch(phase, phase_epoch, epoch)` trains one epoch and returns its mean loss;
    `validate()` returns the validation scores (with `valid_logloss`).
    """
    best = (np.inf, None, -1)
    epoch, stale = 0, 0
    for phase in train_cfg.phases:
        for phase_epoch in range(phase.epochs):
            if train_cfg.early_stopping and stale >= train_cfg.early_stopping:
                if records and not records[-1].get("stopped_early"):
                    records[-1]["stopped_early"] = True
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
                # (No copy of the weights when the last epoch's are kept whatever happens.)
                best, stale = (scores["valid_logloss"], copy.deepcopy(model.state_dict()) if train_cfg.keep == "best" else None, epoch), 0
            else:
                stale += 1
            advance(1, note=f"fold {fold} epoch {epoch} valid logloss {scores['valid_logloss']:.4f}")
    if train_cfg.keep == "last":
        return epoch
    if best[1] is not None:
        model.load_state_dict(best[1])
    return best[2]


def scaled_phases(train_cfg, steps_per_epoch: int):
    """The phases with every epoch count multiplied by one factor, so that a fold trains at least
    `train_cfg.min_steps` optimiser steps (small data sets get enough steps; large ones as given)."""
    import math

    steps = steps_per_epoch * train_cfg.epochs
    if not train_cfg.min_steps or steps >= train_cfg.min_steps:
        return train_cfg
    factor = math.ceil(train_cfg.min_steps / max(steps, 1))
    return train_cfg.model_copy(update={"phases": [p.model_copy(update={"epochs": p.epochs * factor}) for p in train_cfg.phases]})


def first_epochs(train_cfg, epochs: int):
    """The schedule cut after its first `epochs` epochs (phases in order, the last one shortened)."""
    phases, left = [], epochs
    for phase in train_cfg.phases:
        if left <= 0:
            break
        phases.append(phase.model_copy(update={"epochs": min(phase.epochs, left)}))
        left -= phase.epochs
    return train_cfg.model_copy(update={"phases": phases})


def stopping_summary(metrics, kept_epochs: list[int]) -> dict:
    """Per fold: epochs run, the epoch kept, whether early stopping ended it, and whether it
    converged (its lowest validation log loss came before its last epoch: more epochs would not
    have helped, whichever epoch was kept) or ran out of epochs."""
    folds = []
    for fold, kept in enumerate(kept_epochs):
        rows = metrics[metrics.fold == fold] if len(metrics) else metrics
        run = int(rows.epoch.max()) if len(rows) else 0
        early = bool(rows["stopped_early"].fillna(False).astype(bool).any()) if "stopped_early" in rows else False
        scored = rows[rows.valid_logloss.notna()] if "valid_logloss" in rows else rows.iloc[:0]
        best = int(scored.epoch[scored.valid_logloss.idxmin()]) if len(scored) else int(kept)
        if "converged" in rows:  # the linear probe: whether L-BFGS converged on the chosen strength
            converged = bool(rows["converged"].iloc[-1])
        else:
            converged = early or best < run
        folds.append({"fold": fold, "epochs_run": run, "best_epoch": best, "kept_epoch": int(kept), "stopped_early": early, "converged": converged})
    return {"stopping": folds, "converged_folds": sum(f["converged"] for f in folds)}
