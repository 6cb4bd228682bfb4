"""The linear probe's trainer: per fold, standardise, choose the L2 strength on an inner split of
the fold's own training images, refit on all of them, predict (every test-time view, combined).

Full-batch L-BFGS (torch's, on scikit-learn's objective) converges to the optimum of a convex loss,
so there is no epoch count to get wrong; `metrics.csv` records, per fold and strength, the inner
log loss and whether L-BFGS converged within `max_iter`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from fishcomp.cache import Artifact
from fishcomp.config import key_payload
from fishcomp.distributed import world
from fishcomp.features import load_augmented, load_features, load_views, tta_combine
from fishcomp.metrics import accuracy, log_loss
from fishcomp.training.data import FoldResult, TrainData
from fishcomp.training.feature_sets import combine_views


@dataclass
class Probe:
    """A fitted multinomial logistic regression over the classes present in its training rows."""

    classes_: np.ndarray  # the class indices it was fitted on, ascending
    weight: np.ndarray  # (len(classes_), features)
    bias: np.ndarray
    n_iter: int

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import softmax

        return softmax(x.astype(np.float64) @ self.weight.T + self.bias, axis=1)


# L-BFGS stops once every gradient component of the mean objective is below this: ten times
# tighter than scikit-learn's default for the same objective, and still cheap (a step is one
# (rows x features) by (features x classes) product).
GRADIENT_TOLERANCE = 1e-5


def _fit(x: np.ndarray, y: np.ndarray, strength: float, max_iter: int, classes: int, start: Probe | None = None,
         dtype: str = "float32") -> tuple[Probe, bool]:
    """Full-batch L-BFGS to the optimum of scikit-learn's multinomial objective (mean log loss +
    |W|^2 / (2 C n), intercept unpenalised), in torch: scikit-learn's own L-BFGS spends most of
    its time outside the arithmetic (the pipeline's three probes took 100 s with it, 22 s now;
    per-stage seconds in docs/results.md).
    `start`: a probe fitted at a stronger penalty or on fewer rows to warm-start from (along the
    regularisation path each fit then needs a fraction of the iterations).
    `dtype`: the fit's arithmetic (`head.fit_dtype`)."""
    import torch

    present = np.unique(y)
    if start is not None and not np.array_equal(start.classes_, present):
        start = None  # fitted without a class these rows have (a rare one): other shapes, start cold
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))
    targets = torch.from_numpy(np.searchsorted(present, y))
    weight = torch.zeros(len(present), x.shape[1], dtype=inputs.dtype) if start is None else torch.from_numpy(start.weight.astype(dtype))
    bias = torch.zeros(len(present), dtype=inputs.dtype) if start is None else torch.from_numpy(start.bias.astype(dtype))
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-12)
    penalty = 1.0 / (2.0 * strength * len(y))

    def objective():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs @ weight.T + bias, targets) + penalty * (weight * weight).sum()
        loss.backward()
        return loss

    optimiser.step(objective)
    n_iter = optimiser.state[weight]["n_iter"]
    with torch.no_grad():
        gradient = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    probe = Probe(present, weight.detach().numpy(), bias.detach().numpy(), n_iter)
    # Converged: stopped by the gradient (or by no further progress), not by running out of steps.
    return probe, bool(n_iter < max_iter or gradient <= GRADIENT_TOLERANCE)


def _probs(model: Probe, x: np.ndarray, classes: int) -> np.ndarray:
    """Probabilities over every class, also those absent from this fold's training images."""
    out = np.full((len(x), classes), 1e-6)
    out[:, model.classes_] = model.predict_proba(x)
    return out / out.sum(axis=1, keepdims=True)


@dataclass
class InnerFit:
    """One inner split of a fold's training images: the probe fitted on its training part at the
    chosen strength, and the two parts: what a model built on the probe can be tuned against, as
    the strength was."""

    probe: FoldProbe
    train: np.ndarray
    valid: np.ndarray


@dataclass
class FoldProbe:
    """A fold's probe: the fitted model and the standardisation it reads its inputs through."""

    model: Probe
    mean: np.ndarray
    scale: np.ndarray
    strength: float  # chosen on the inner splits
    converged: bool
    tried: int  # strengths tried on each inner split
    inner: list[InnerFit] = field(default_factory=list)
    refit_strength: float | None = None  # what the model was fitted at, where not `strength` (`head.refit_scale`)

    def predict(self, x: np.ndarray, classes: int) -> np.ndarray:
        """Probabilities over every class for rows as cached (it standardises them itself)."""
        return _probs(self.model, (x - self.mean) / self.scale, classes)

    def state_dict(self, classes: int) -> dict:
        """The weights of a `LinearProbe` module (models.heads.linear) over every class: a class
        absent from the fold's training rows is never predicted."""
        import torch

        weight = np.zeros((classes, len(self.mean)), dtype=np.float32)
        bias = np.full(classes, -30.0, dtype=np.float32)
        weight[self.model.classes_], bias[self.model.classes_] = self.model.weight, self.model.bias
        return {"mean": torch.from_numpy(self.mean), "scale": torch.from_numpy(self.scale),
                "classifier.weight": torch.from_numpy(weight), "classifier.bias": torch.from_numpy(bias)}


def _standardisation(x: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) each probe reads its rows through: its own training rows' per feature, each
    scale at least `floor` times the median feature's (`head.scale_floor`)."""
    std = x.std(axis=0)
    return x.mean(axis=0), np.maximum(std, floor * np.median(std)) + 1e-6


@dataclass
class _BagMember:
    x: np.ndarray  # its training rows, standardised
    y: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    model: Probe | None = None  # the last fit: the next strength starts from it


class InnerBag:
    """`head.inner_bag` probes on an inner split's training positions, each fitted on all of them
    but one part (as each fold model is on all the images but its fold), standardised on its own
    rows: their mean on the held images stands for the folds' mean on a test image."""

    def __init__(self, rows: "ProbeRows", positions: np.ndarray, head, seed: list[int], classes: int):
        parts = np.array_split(np.random.default_rng(seed).permutation(np.sort(positions)), head.inner_bag)
        self.head, self.classes = head, classes
        self.members = []
        for left_out in range(len(parts)):
            x, y = rows(np.concatenate([part for number, part in enumerate(parts) if number != left_out]))
            mean, scale = _standardisation(x, head.scale_floor)
            self.members.append(_BagMember((x - mean) / scale, y, mean, scale))

    def fit(self, strength: float) -> None:
        """Every member refitted at `strength` (call in increasing strength: each member
        warm-starts from its fit at the previous one)."""
        for member in self.members:
            member.model, _ = _fit(member.x, member.y, strength, self.head.max_iter, self.classes, member.model, self.head.fit_dtype)

    def probs(self, rows: np.ndarray) -> np.ndarray:
        """The members' mean probabilities on `rows` (as cached) at the strength last fitted."""
        return np.mean([_probs(m.model, (rows - m.mean) / m.scale, self.classes) for m in self.members], axis=0)


class ProbeRows:
    """A probe's training rows for given positions: each image, and its augmented copies as more
    rows (float32, read once). `widen(positions)`: the rows that train with those images (rows
    after the images', e.g. their further crops with `crops.candidates.train`); only images are
    ever scored."""

    def __init__(self, originals, copies, labels: np.ndarray, widen=None):
        self.originals = np.asarray(originals, dtype=np.float32)
        self.copies = [np.asarray(c, dtype=np.float32) for c in copies]
        self.labels = labels
        self.widen = widen or (lambda positions: positions)

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The rows that train with the images once each: their copies would only repeat them
        # (L-BFGS's time grows with the rows).
        widened = self.widen(positions)
        x = np.concatenate([self.originals[widened], *[c[positions] for c in self.copies]])
        return x, np.concatenate([self.labels[widened], *[self.labels[positions]] * len(self.copies)])


def fit_fold_probe(rows: ProbeRows, train: np.ndarray, head, seed: int, fold: int, classes: int, records: list, started: float,
                   held_loss=None) -> FoldProbe:
    """Standardise, choose the L2 strength by its mean log loss over `head.inner_repeats` inner
    splits of the fold's training positions `train` (scored on their original images, by one
    probe or by `head.inner_bag`'s mean), refit on all of them.
    `rows(positions) -> (x, y)`: the rows to fit on for those positions (with augmented copies).
    `head`: the strengths, inner fraction and repeats, iteration limit (`LinearHeadConfig`'s fields).
    `held_loss(positions, probs_of) -> log loss`: how held images are scored, given the probe's
    probabilities as a function of cached rows (None: their original rows' probabilities; the
    crops' `candidates.inner: mixture` scores the mixture each photo's crops make).
    Appends one record per strength and inner split to `records`."""
    originals, labels = rows.originals, rows.labels
    if held_loss is None:
        def held_loss(positions, probs_of):
            return log_loss(labels[positions], probs_of(originals[positions]))
    strengths = sorted(head.strengths)  # strongest penalty first: each fit warm-starts the next
    scores: dict[float, list[float]] = {strength: [] for strength in strengths}
    splits = []
    for repeat in range(head.inner_repeats):
        # The first split's seed is the one a single split always had (its results unchanged).
        order = np.random.default_rng([seed, fold, 29, *([repeat] if repeat else [])]).permutation(train)
        inner_valid = order[: max(1, round(len(order) * head.inner_fraction))]
        inner_train = order[len(inner_valid):]
        x_inner, y_inner = rows(inner_train)
        mean, scale = _standardisation(x_inner, head.scale_floor)
        bag = InnerBag(rows, inner_train, head, [seed, fold, 31, repeat], classes) if head.inner_bag else None
        fitted, model = {}, None
        for number, strength in enumerate(strengths, start=1):
            model, converged = _fit((x_inner - mean) / scale, y_inner, strength, head.max_iter, classes, model, head.fit_dtype)
            fitted[strength] = (model, converged)
            alone = held_loss(inner_valid, lambda x: _probs(model, (x - mean) / scale, classes))
            if bag is not None:
                bag.fit(strength)
            scores[strength].append(alone if bag is None else held_loss(inner_valid, bag.probs))
            records.append({"fold": fold, "epoch": number, "lr": strength, "strength": strength, "inner_logloss": scores[strength][-1],
                            **({"inner_single_logloss": alone} if bag is not None else {}),
                            "converged": converged, **({"repeat": repeat} if head.inner_repeats > 1 else {}),
                            "seconds": round(time.time() - started, 3)})
        splits.append((np.sort(inner_train), np.sort(inner_valid), mean, scale, fitted))
    best = min(strengths, key=lambda strength: float(np.mean(scores[strength])))
    x, y = rows(train)
    mean, scale = _standardisation(x, head.scale_floor)
    # The refit on all the fold's images starts from the first inner fit at the chosen strength:
    # the same convex problem on 25 % more rows (at `refit_scale` times the strength, a nearby
    # one), so L-BFGS starts near its optimum.
    refit = best * (head.refit_scale or 1.0)
    model, converged = _fit((x - mean) / scale, y, refit, head.max_iter, classes, splits[0][4][best][0], head.fit_dtype)
    inner = [InnerFit(FoldProbe(fitted[best][0], inner_mean, inner_scale, best, fitted[best][1], len(strengths)), part, held)
             for part, held, inner_mean, inner_scale, fitted in splits]
    return FoldProbe(model, mean, scale, best, converged, len(strengths), inner, refit if head.refit_scale else None)


class LinearProbeFolds:
    def __init__(self, data: TrainData, features_artifact: Artifact, candidates=None, held_loss=None):
        """`candidates`: the further crops that train with their photos (`crops.candidates.train`),
        as `CandidateRows`. `held_loss`: how a strength is scored on the inner split (`fit_fold_probe`)."""
        self.data, self.held_loss = data, held_loss
        self.head = data.loaded.config.head
        self.tta = tta_combine(data.loaded)
        kind = self.head.input
        # The backbone's pooled vectors as cached, or the maps pooled here (`head.pool`).
        if kind == "map":
            from fishcomp.models.pooling import pooled_rows

            as_float = lambda array: pooled_rows(array, self.head.pool)  # noqa: E731
        else:
            as_float = lambda array: np.asarray(array, dtype=np.float32)  # noqa: E731
        cached = load_features(features_artifact, "train", kind)
        # What the folds' checkpoints read, (C,) or (C, H, W): the module pools a map itself.
        self.in_shape = tuple(cached.shape[1:])
        copies, _ = load_augmented(features_artifact, kind)
        self.train_views = [as_float(v)[data.usable] for v in load_views(features_artifact, "train", kind)] if self.tta else []
        # `train.mirror_copies`: the mirrored views are more rows to fit on, as augmented copies are.
        copy_rows = self.train_views if data.loaded.config.train.mirror_copies else [as_float(c)[data.usable] for c in copies]
        originals, labels, widen, self.candidates = as_float(cached)[data.usable], data.labels, None, candidates
        if self.candidates is not None:
            extra = self.candidates
            originals = np.concatenate([originals, as_float(extra.features)])
            labels = np.concatenate([labels, extra.labels])
            widen = extra.widen
        self.rows = ProbeRows(originals, copy_rows, labels, widen)
        self.train = self.rows.originals
        self.tests = {s: as_float(load_features(features_artifact, s, kind)) for s in data.test_splits}
        self.test_views = {s: [as_float(v) for v in load_views(features_artifact, s, kind)] if self.tta else [] for s in data.test_splits}

    def _predict(self, probe: FoldProbe, original: np.ndarray, views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        classes = len(self.data.classes)
        first = probe.predict(original, classes)
        if not views:
            return first, first
        return combine_views([first, *[probe.predict(v, classes) for v in views]], self.tta), first

    def fit(self, fold: int, train: np.ndarray, valid: np.ndarray, records: list, advance, spread: bool = False) -> FoldResult | None:
        from fishcomp.models.heads import create_head

        data, head = self.data, self.head
        classes = len(data.classes)
        started = time.time()
        # The strength is chosen without the fold's validation images: an inner split of its train.
        probe = fit_fold_probe(self.rows, train, head, data.loaded.config.train.seed, fold, classes,
                               records, started, self.held_loss)
        best, converged = probe.strength, probe.converged
        valid_probs, valid_original = self._predict(probe, self.train[valid], [v[valid] for v in self.train_views])
        train_probs = probe.predict(self.train[train], classes)
        records.append({
            "fold": fold, "epoch": probe.tried + 1, "lr": best, "strength": best, "chosen": True, "converged": converged,
            **({"refit_strength": probe.refit_strength} if probe.refit_strength else {}),
            "train_loss": log_loss(data.labels[train], train_probs),
            "valid_logloss": log_loss(data.labels[valid], valid_probs) if len(valid) else np.nan,
            "valid_accuracy": accuracy(data.labels[valid], valid_probs) if len(valid) else np.nan,
            "seconds": round(time.time() - started, 3),
        })
        advance(data.loaded.config.train.epochs, note=f"fold {fold} strength {best:g}")
        if spread and not world().is_main:
            return None
        predictor = dataclasses.replace(probe, inner=[])  # what a later build reuses (`EarlierFolds`): the inner fits are spent
        tests = self._predict_tests(predictor)
        module = create_head(head, self.in_shape, classes)
        module.load_state_dict(probe.state_dict(classes))
        return FoldResult(
            valid_probs=valid_probs, valid_probs_original=valid_original, valid_extras={},
            test_probs=tests, test_extras={s: {} for s in data.test_splits}, kept_epoch=probe.tried + 1,
            checkpoint={"state_dict": module.state_dict(), "head": key_payload(head), "classes": data.classes,
                        "in_shape": self.in_shape, "size_vocabulary": data.vocabulary},
            predictor=predictor,
        )

    def _predict_tests(self, probe: FoldProbe) -> dict:
        return {s: self._predict(probe, self.tests[s], self.test_views[s])[0] for s in self.data.test_splits}

    def predict_tests(self, result: FoldResult) -> tuple[dict, dict]:
        """A reused fold's test predictions (`EarlierFolds`), from the probe it keeps."""
        return self._predict_tests(result.predictor), {s: {} for s in self.data.test_splits}

    def summary(self) -> dict:
        return {"features": self.head.input, **({"pool": self.head.pool} if self.head.pool else {}), "tta_views": 1 + len(self.train_views), "augment_copies": len(self.rows.copies), "pseudo": None,
                **({"candidate_crops_trained": self.candidates.counts} if self.candidates is not None else {})}
