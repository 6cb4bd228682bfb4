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

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fishcomp.boxes import covered
from fishcomp.cache import Artifact
from fishcomp.console import warn
from fishcomp.context import training_precision
from fishcomp.errors import FishcompError
from fishcomp.data.annotations import Annotations
from fishcomp.features import every_fish_boxes, load_features, load_views, tta_combine
from fishcomp.metrics import log_loss
from fishcomp.training.data import FoldResult, TrainData, size_onehot
from fishcomp.training.feature_sets import FeatureSet, combine_views, predict

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


# A further crop holding at least HOLDS_FISH of an annotated fish's box shows that fish; one holding
# under MISSES_FISH of every fish's shows none (deck, water, gear), so it is a NoF crop; one in
# between shows part of a fish and teaches nothing clear: left out.
HOLDS_FISH, MISSES_FISH = 0.6, 0.1


def candidate_labels(photo_labels: np.ndarray, rectangles: np.ndarray, fish: np.ndarray, nof: int) -> np.ndarray:
    """(further, photos) the class each further crop teaches, -1 where it is left out: a NoF
    photo's crops are NoF; a fish photo's are its class where one holds a fish (`HOLDS_FISH`), NoF
    where one misses every fish (`MISSES_FISH`). `rectangles` (further, photos, 4) and `fish`
    (photos, fish, 4) in the same units; a fish photo without any annotated box teaches nothing."""
    share = covered(rectangles, np.broadcast_to(fish, (len(rectangles), *fish.shape)))
    labels = np.full(share.shape, -1)
    annotated = ~np.isnan(fish).all(axis=(1, 2))
    is_nof = photo_labels == nof
    labels[:, is_nof] = nof
    fish_photo = annotated & ~is_nof
    labels[(share >= HOLDS_FISH) & fish_photo] = np.broadcast_to(photo_labels, share.shape)[(share >= HOLDS_FISH) & fish_photo]
    labels[(share < MISSES_FISH) & fish_photo] = nof
    labels[np.isnan(share)] = -1  # the cells ran out: no crop
    return labels


@dataclass
class CandidateRows:
    """The further crops of the training photos the crop classifier trains on
    (`crops.candidates.train`), each with the photo it came from (a position among the usable
    training photos), so a fold trains on its own photos' crops only and validates on none."""

    features: np.ndarray  # (rows, dim)
    mirrored: np.ndarray | None  # each crop mirrored (the crops' test-time view), or None
    labels: np.ndarray
    owner: np.ndarray
    counts: dict
    photos: int  # usable training photos: the crops' rows come after theirs

    def widen(self, positions: np.ndarray) -> np.ndarray:
        """These photo positions and, after the photos' rows, their crops' rows."""
        return np.concatenate([positions, self.photos + np.flatnonzero(np.isin(self.owner, positions))])

    def copies(self, count: int) -> list[np.ndarray]:
        """`count` augmented copies of the crops, to stand beside a photo's copies: mirrored and as
        they are in turn (as the jittered copies alternate)."""
        return [self.mirrored if k % 2 == 0 and self.mirrored is not None else self.features for k in range(count)]


def candidate_rows(data: TrainData, features: Artifact, annotations: Annotations) -> CandidateRows | None:
    """The labelled further crops (`candidate_labels`) of every usable training photo, read from
    the crops artifact (their crop rectangles from `crop_boxes.csv`); None, said, where no photo
    has a box."""
    loaded = data.loaded
    if "NoF" not in data.classes:
        raise FishcompError(f"{loaded.path}: crops.candidates.train labels the crops that miss every fish NoF, but the data has no NoF class; "
                            "leave candidates.train out")
    if not has_candidates(features):
        raise FishcompError(f"{features.path} holds no further crops: set crops.candidates.count and rebuild it for crops.candidates.train")
    index = data.usable_index
    fish = every_fish_boxes(index, annotations)
    if np.isnan(fish).all():
        # As the crops stage does on such data: said, and trained as without the setting.
        warn(f"train      [{loaded.name}] crops.candidates.train ignored: no train image has a box (no *_labels.json in the data's "
             "annos/ folder), so nothing tells which further crops hold a fish")
        return None
    copies = json.loads(features.file("meta.json").read_text())["augment_copies"]
    table = pd.read_csv(features.file("crop_boxes.csv"))
    table = table[(table.split == "train") & (table["copy"] > copies)]
    further = int(table["copy"].max()) - copies
    rectangles = np.full((further, len(index), 4), np.nan)
    position = pd.Series(np.arange(len(index)), index=index.image)
    at = position.reindex(table.image).to_numpy()
    kept = ~np.isnan(at)
    scale = index[["width", "height", "width", "height"]].to_numpy(dtype=float)
    rows = at[kept].astype(int)
    rectangles[table["copy"].to_numpy()[kept] - copies - 1, rows] = table[["x", "y", "w", "h"]].to_numpy(dtype=float)[kept] / scale[rows]
    nof = data.classes.index("NoF")
    labels = candidate_labels(data.labels, rectangles, fish, nof)
    arrays, mirrored, _ = _split_candidates(features, "train")
    crop, owner = np.nonzero(labels >= 0)
    usable = data.usable[owner]  # the artifact's rows are every train photo's, the usable ones among them
    is_fish_photo = data.labels != nof
    return CandidateRows(
        features=arrays[crop, usable], mirrored=None if mirrored is None else mirrored[crop, usable],
        labels=labels[crop, owner], owner=owner, photos=len(data.labels),
        counts={"fish": int(((labels >= 0) & (labels != nof)).sum()), "nof_in_fish_photos": int((labels == nof)[:, is_fish_photo].sum()),
                "nof_photos": int((labels == nof)[:, ~is_fish_photo].sum()),
                "left_out": int(((labels < 0) & ~np.isnan(rectangles).any(axis=-1)).sum())},
    )


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


def _allowed(settings, nof: int | None) -> tuple[tuple[str, ...], list[float]]:
    """The weight rules and shares `crops.candidates` lets out of fold choose among."""
    setting = settings.weights or "cells"
    rules = (WEIGHT_RULES if nof is not None else ("cells",)) if setting == "auto" else (setting,)
    return rules, list(SHARES) if settings.share == "auto" else [settings.share]


class MixtureLoss:
    """`crops.candidates.inner: mixture`: a probe's held training photos scored as their
    predictions will be made, each photo's usual crop and further crops classified (both views,
    combined as the run combines them) and mixed by the rule and share, among those the settings
    allow, that score lowest on them (as `mix_candidates` chooses out of fold). A `held_loss` for
    `fit_fold_probe`."""

    def __init__(self, labels: np.ndarray, crops: list[list[np.ndarray]], weights: np.ndarray, rules, shares, nof: int | None, tta: str | None):
        """`crops`: per crop of each photo (the usual one first), its views' rows (the crop as
        embedded, then its mirror where there is one); `weights` (photos, crops): the cells'."""
        self.labels, self.crops, self.weights, self.rules, self.shares, self.nof, self.tta = labels, crops, weights, rules, shares, nof, tta

    @classmethod
    def from_artifact(cls, data: TrainData, features: Artifact) -> "MixtureLoss":
        """The usable training photos' crops as the crops artifact holds them."""
        loaded = data.loaded
        tta = tta_combine(loaded)
        nof = data.classes.index("NoF") if "NoF" in data.classes else None
        rules, shares = _allowed(loaded.config.crops.candidates, nof)
        rows = lambda array: np.asarray(array[data.usable], dtype=np.float32)  # noqa: E731
        further, views, weights = _split_candidates(features, "train")
        usual = [rows(load_features(features, "train", "pooled")), *([rows(v) for v in load_views(features, "train", "pooled")] if tta else [])]
        crops = [usual] + [[rows(further[k]), *([rows(views[k])] if tta and views is not None else [])] for k in range(len(further))]
        return cls(data.labels, crops, weights[data.usable], rules, shares, nof, tta)

    def __call__(self, positions: np.ndarray, probs_of) -> float:
        crops = [combine_views([probs_of(view[positions]) for view in views], self.tta or "mean") for views in self.crops]
        first, further, weights = crops[0], np.stack(crops[1:]), self.weights[positions]
        return min(log_loss(self.labels[positions], mixture(first, further, weights, share, rule, self.nof))
                   for rule in self.rules for share in self.shares)


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
    rules, shares_tried = _allowed(settings, nof)
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
