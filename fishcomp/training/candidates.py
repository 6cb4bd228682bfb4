"""The crops' further candidate boxes (`crops.candidates`), classified and mixed in.

Where the box source is unsure (two places look alike; a boat it never saw), its one box misses
the fish and the crop classifier then says something confident about a crop of deck. The crops
stage also embeds the next most probable places of each photo; here every fold model classifies
them (its own validation images' and every test image's, as it does the usual crop), and each
photo's prediction becomes a mixture: the crops weighted by their cells' probabilities, mixed with
the usual crop's at `crops.candidates.share` (auto: the share with the lowest out-of-fold log loss),
each crop's weight scaled by what the classifier sees in it as `crops.candidates.weights` says.
"""

from __future__ import annotations

import numpy as np

from fishcomp.cache import Artifact
from fishcomp.context import training_precision
from fishcomp.errors import FishcompError
from fishcomp.features import tta_combine
from fishcomp.metrics import log_loss
from fishcomp.training.data import FoldResult, TrainData, size_onehot
from fishcomp.training.feature_sets import FeatureSet, predict

SHARES = np.linspace(0.0, 1.0, 21)


def has_candidates(features: Artifact) -> bool:
    return features.file("train_candidates_pooled.npy").is_file()


def _split_candidates(features: Artifact, split: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(candidates (count - 1, rows, dim), their mirrored views (the same shape; None without),
    weights (rows, count)), read into memory once: every fold reads them all."""
    arrays = np.load(features.file(f"{split}_candidates_pooled.npy"))
    mirrored = features.file(f"{split}_candidates_tta_pooled.npy")
    views = np.load(mirrored) if mirrored.is_file() else None
    return arrays, views, np.load(features.file(f"{split}_candidate_weights.npy"))


def candidate_shares(weights: np.ndarray) -> np.ndarray:
    """(rows, count): each crop's share of a photo's mixture, its weight over the photo's total; a
    photo without weights (no cell map for it) is its usual crop alone."""
    total = weights.sum(axis=1, keepdims=True)
    return np.where(total > 0, weights / np.where(total > 0, total, 1.0), np.eye(weights.shape[1])[0])


# How each crop's cell weight is scaled by what the crop classifier sees in that crop: `cells`
# not at all; `fish` by its probability of a fish, 1 - P(NoF); `fish_class` by its most probable
# fish class's probability, a crop that shows one kind of fish plainly.
WEIGHT_RULES = ("cells", "fish", "fish_class")


def mixture_shares(first: np.ndarray, further: np.ndarray, weights: np.ndarray, rule: str = "cells", nof: int | None = None) -> np.ndarray:
    """(rows, count): each crop's share of a photo's mixture: its cell weight, scaled as `rule`
    says (`WEIGHT_RULES`; `nof`: the NoF class's column) by the classifier's own prediction on it
    (`first`: the usual crop's (rows, classes), `further`: (count - 1, rows, classes))."""
    if rule != "cells":
        crops = np.concatenate([first[None], further])  # (count, rows, classes)
        seen = 1.0 - crops[:, :, nof] if rule == "fish" else np.delete(crops, nof, axis=2).max(axis=2)
        weights = weights * seen.T
    return candidate_shares(weights)


def mixture(first: np.ndarray, further: np.ndarray, weights: np.ndarray, share: float, rule: str = "cells", nof: int | None = None) -> np.ndarray:
    """(rows, classes): the usual crop's probabilities `first`, mixed at `share` with every crop's
    (`first`, then `further` (count - 1, rows, classes)) weighted as `mixture_shares` says. A row
    without weights (no cell map for it) keeps its usual crop's."""
    shares = mixture_shares(first, further, weights, rule, nof)
    mixed = shares[:, :1] * first + np.einsum("rk,krc->rc", shares[:, 1:], further)
    return (1.0 - share) * first + share * mixed


def mix_candidates(data: TrainData, features: Artifact, results: dict[int, FoldResult], model_for) -> dict:
    """Every fold's validation and test predictions replaced, in place, by the mixture with its
    own predictions on the candidate crops; the share fitted on all out-of-fold rows when `auto`.
    `model_for(fold)`: that fold's model. Returns the summary's `candidates` entry and each
    train image's crops' shares of its out-of-fold mixture ((images, count), rows as `oof.csv`'s;
    NaN where never validated)."""
    loaded = data.loaded
    settings = loaded.config.crops.candidates
    nof = data.classes.index("NoF") if "NoF" in data.classes else None
    setting = settings.weights or "cells"
    if nof is None and setting not in ("cells", "auto"):
        raise FishcompError(f"{loaded.path}: crops.candidates.weights: {setting} reads each crop's P(NoF), but the data has no NoF class; "
                            "set candidates.weights: cells")
    rules = (WEIGHT_RULES if nof is not None else ("cells",)) if setting == "auto" else (setting,)
    tta, dtype = tta_combine(loaded), training_precision(loaded, data.device)
    train, train_views, train_weights = _split_candidates(features, "train")
    sizes = size_onehot(data.usable_index, data.vocabulary)
    weights = train_weights[data.usable]
    first = np.full((len(data.labels), len(data.classes)), np.nan)
    further = np.full((len(train), len(data.labels), len(data.classes)), np.nan)
    tests = {split: _split_candidates(features, split) for split in data.test_splits}
    test_sizes = {split: size_onehot(data.index[data.index.split == split], data.vocabulary) for split in data.test_splits}
    test_further: dict[int, dict[str, np.ndarray]] = {}

    def classify(model, arrays, views, rows, row_sizes) -> np.ndarray:
        """(count - 1, rows, classes): the model's predictions on each further candidate's crops."""
        return np.stack([
            predict(model, FeatureSet(arrays[k], rows, row_sizes, views=[] if views is None else [views[k]]), data.device, tta=tta, dtype=dtype)["probs"]
            for k in range(len(arrays))
        ])

    for fold, result in results.items():
        model = model_for(fold)
        valid = np.flatnonzero(data.folds == fold)
        first[valid] = result.valid_probs
        further[:, valid] = classify(model, train, train_views, data.usable[valid], sizes[valid])
        test_further[fold] = {}
        for split, (arrays, views, _) in tests.items():
            test_further[fold][split] = classify(model, arrays, views, np.arange(arrays.shape[1]), test_sizes[split])

    validated = data.folds >= 0
    labels = data.labels[validated]

    def scored(share: float, rule: str) -> float:
        return log_loss(labels, mixture(first[validated], further[:, validated], weights[validated], share, rule, nof))

    # Each rule at its best share (or the given one); `auto` keeps the rule that scores lowest.
    shares_tried = SHARES if settings.share == "auto" else [settings.share]
    best = {}
    for rule in rules:
        losses = [scored(s, rule) for s in shares_tried]
        best[rule] = (round(float(shares_tried[int(np.argmin(losses))]), 2), float(min(losses)))
    rule = min(best, key=lambda r: best[r][1])
    share = best[rule][0]
    for fold, result in results.items():
        valid = np.flatnonzero(data.folds == fold)
        result.valid_probs = mixture(result.valid_probs, further[:, valid], weights[valid], share, rule, nof)
        for split, (_, _, split_weights) in tests.items():
            result.test_probs[split] = mixture(result.test_probs[split], test_further[fold][split], split_weights, share, rule, nof)
    shares = np.full(weights.shape, np.nan, dtype=np.float32)
    shares[validated] = mixture_shares(first[validated], further[:, validated], weights[validated], rule, nof)
    have = validated & (weights.sum(axis=1) > 0)
    return {
        "count": settings.count, "share": share, "share_setting": settings.share, "weights": rule, "weights_setting": setting,
        "usual_crop_alone": scored(0.0, "cells"), "mixed": best[rule][1],
        # Every rule tried: its share and out-of-fold log loss.
        "by_rule": {r: {"share": best[r][0], "mixed": best[r][1]} for r in rules},
        # How much of the mixture the usual crop holds, on average: near 1 where the box source is sure.
        "usual_crop_weight": float(shares[have, 0].mean()) if have.any() else None,
    }, shares
