"""The competition's metric and the two clippings the lesson used before submitting."""

from __future__ import annotations

import numpy as np

# Kaggle clips every probability to [1e-15, 1 - 1e-15] after dividing each row by its sum.
KAGGLE_EPS = 1e-15


def normalise_rows(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class log loss exactly as the competition scores it."""
    return float(np.mean(image_log_losses(labels, probs)))


def image_log_losses(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each image's term of the competition's log loss (their mean is `log_loss`)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.clip(normalise_rows(probs), KAGGLE_EPS, 1 - KAGGLE_EPS)
    return -np.log(probs[np.arange(len(labels)), labels])


# A 95 % percentile interval: the percentiles of the bootstrap means that bound it.
INTERVAL = (2.5, 97.5)


def paired_difference(loss_a: np.ndarray, loss_b: np.ndarray, resamples: int = 2000, rng: np.random.Generator | None = None,
                      groups: np.ndarray | None = None) -> dict:
    """B's mean per-image log loss minus A's on the same images, with the 95 % bootstrap interval
    of that mean (the images drawn with replacement, the same draw for both): where it holds 0,
    the images cannot tell A and B apart. Most of what separates two means on a few hundred images
    is which images are hard, the same for both, and pairing takes that out.

    With `groups` (a label per image, say its boat), whole groups are drawn instead (a cluster
    bootstrap): images of one boat err together, and the interval then says whether the
    difference holds from boat to boat rather than from image to image."""
    loss_a, loss_b = np.asarray(loss_a, dtype=np.float64), np.asarray(loss_b, dtype=np.float64)
    rng = rng if rng is not None else np.random.default_rng(0)
    difference = loss_b - loss_a
    n = len(difference)
    if groups is None:
        means = difference[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    else:
        _, member = np.unique(np.asarray(groups), return_inverse=True)
        sums, counts = np.bincount(member, weights=difference), np.bincount(member).astype(np.float64)
        drawn = rng.integers(0, len(sums), size=(resamples, len(sums)))
        means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    low, high = np.percentile(means, INTERVAL)
    # Equal to the last digits the metric prints: the same prediction, not a tie of chance.
    tie = np.isclose(loss_a, loss_b, rtol=0, atol=1e-9)
    return {
        "images": n, "groups": None if groups is None else int(len(np.unique(np.asarray(groups)))),
        "logloss_a": float(loss_a.mean()), "logloss_b": float(loss_b.mean()),
        "difference": float(difference.mean()), "low": float(low), "high": float(high),
        "b_better": int(np.sum((difference < 0) & ~tie)), "b_worse": int(np.sum((difference > 0) & ~tie)),
    }


def difference_verdict(row: dict) -> str:
    """`paired_difference`'s answer in words: a winner only where the interval leaves out 0."""
    if row["high"] < 0:
        return "B better"
    if row["low"] > 0:
        return "A better"
    return "within noise"


def fold_mean_gain(test_folds: np.ndarray) -> float:
    """How much lower the log loss of k fold models' mean is than one fold model's, estimated
    without labels from their test predictions (folds x rows x classes): the mean over the rows
    and folds of KL(the mean || fold k), which is that gain exactly were the mean's probabilities
    the truth (Jensen's gap of the log loss). Out of fold scores one fold model per image, a
    submission is their mean: this is the part of the submission out of fold cannot see."""
    folds = np.clip(np.asarray(test_folds, dtype=np.float64), KAGGLE_EPS, 1.0)
    mean = folds.mean(axis=0)
    return float(np.mean(np.sum(mean * (np.log(mean) - np.log(folds)), axis=2)))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def prior_log_loss(train_labels: np.ndarray, eval_labels: np.ndarray, num_classes: int) -> float:
    """The score of always predicting the training class frequencies: the bar every model must beat."""
    prior = np.bincount(train_labels, minlength=num_classes) + 1.0  # +1: no zero for an unseen class
    return log_loss(eval_labels, np.tile(prior / prior.sum(), (len(eval_labels), 1)))


def do_clip(probs: np.ndarray, mx: float) -> np.ndarray:
    """The lesson's clipping, np.clip(p, (1 - mx) / 7, mx) generalised to C classes, then each row
    divided by its sum. Kaggle renormalises every row before scoring anyway, so renormalising here
    changes no score; it makes the written file what is scored, and every submission row sum to one."""
    return normalise_rows(np.clip(probs, (1 - mx) / (probs.shape[1] - 1), mx))


def eps_clip(probs: np.ndarray, eps: float) -> np.ndarray:
    """Clip to [eps, 1 - eps] and renormalise so rows still sum to one."""
    return normalise_rows(np.clip(probs, eps, 1 - eps))


def per_class_scores(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[dict]:
    """Each class's image count, log loss (its images' share of the total) and recall."""
    labels = np.asarray(labels)
    rows = []
    for index, name in enumerate(classes):
        mine = labels == index
        if not mine.any():
            rows.append({"class": name, "images": 0, "log_loss": float("nan"), "accuracy": float("nan")})
            continue
        rows.append(
            {"class": name, "images": int(mine.sum()), "log_loss": log_loss(labels[mine], probs[mine]), "accuracy": accuracy(labels[mine], probs[mine])}
        )
    return rows


def size_only_log_loss(labels: np.ndarray, sizes: np.ndarray, folds: np.ndarray, num_classes: int) -> tuple[float, float]:
    """The leakage as one number: out-of-fold log loss of a model that sees only the image size
    (class frequencies per size, +1 smoothed, the prior for a size unseen in training), next to
    the prior's on the same folds. Equal when sizes carry no information."""
    labels, sizes, folds = np.asarray(labels), np.asarray(sizes).astype(str), np.asarray(folds)
    by_size = np.zeros((len(labels), num_classes))
    prior = np.zeros((len(labels), num_classes))
    for fold in np.unique(folds[folds >= 0]):
        train, valid = (folds != fold), folds == fold
        counts = np.bincount(labels[train], minlength=num_classes) + 1.0
        prior[valid] = counts / counts.sum()
        for size in np.unique(sizes[valid]):
            seen = train & (sizes == size)
            table = np.bincount(labels[seen], minlength=num_classes) + 1.0 if seen.any() else counts
            by_size[valid & (sizes == size)] = table / table.sum()
    validated = folds >= 0
    return log_loss(labels[validated], by_size[validated]), log_loss(labels[validated], prior[validated])


def attention_scores(maps: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """Does a class heatmap look at the fish? Over images with a box ((x, y, w, h) fractions):
    `pointing`, the share whose peak lies in the box; `mass`, the mean share of the map's mass
    (shifted to be non-negative) on cells inside the box; `chance`, the mean box area share,
    which both scores equal for a map that ignores where the fish is."""
    n, h, w = maps.shape
    xs, ys = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h
    inside = (
        (xs[None, None, :] >= boxes[:, 0, None, None]) & (xs[None, None, :] <= (boxes[:, 0] + boxes[:, 2])[:, None, None])
        & (ys[None, :, None] >= boxes[:, 1, None, None]) & (ys[None, :, None] <= (boxes[:, 1] + boxes[:, 3])[:, None, None])
    )
    flat = maps.reshape(n, -1)
    peak = np.zeros_like(flat, dtype=bool)
    peak[np.arange(n), flat.argmax(axis=1)] = True
    shifted = maps - maps.reshape(n, -1).min(axis=1)[:, None, None]
    total = shifted.reshape(n, -1).sum(axis=1)
    mass = np.where(total > 0, (shifted * inside).reshape(n, -1).sum(axis=1) / np.maximum(total, 1e-12), inside.reshape(n, -1).mean(axis=1))
    return {
        "pointing": float(inside.reshape(n, -1)[peak].mean()),
        "mass": float(mass.mean()),
        "chance": float(np.clip(boxes[:, 2] * boxes[:, 3], 0, 1).mean()),
        "images": int(n),
    }
