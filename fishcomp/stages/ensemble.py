"""Stage 3: blend the predictions of several trained configs.

Members must have predicted the same train images with the same folds, or their out-of-fold
predictions could not be compared (and a blend tuned on them would leak).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np

from fishcomp.blending import (
    WEIGHT_FITTERS,
    blend,
    cross_fitted_blend,
    cross_fitted_stack,
    fit_stacker,
    stack_predict,
)
from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, key_payload
from fishcomp.console import warn
from fishcomp.context import Context
from fishcomp.errors import FishcompError
from fishcomp.graph import Node, Resolver, Stage, register_stage
from fishcomp.metrics import difference_verdict, fold_mean_gain, image_log_losses, log_loss, paired_difference
from fishcomp.predictions import Predictions, read_predictions


def _check_aligned(names: list[str], members: list[Predictions]) -> None:
    first = members[0]
    for name, other in zip(names[1:], members[1:]):
        if other.classes != first.classes:
            raise FishcompError(f"ensemble members {names[0]} and {name} predict different classes")
        if not first.oof.image.equals(other.oof.image):
            raise FishcompError(f"ensemble members {names[0]} and {name} were trained on different images")
        if not first.oof.fold.equals(other.oof.fold):
            raise FishcompError(
                f"ensemble members {names[0]} and {name} use different folds; give them the same `split` section"
            )
        for split, frame in first.tests.items():
            if split not in other.tests or not frame.image.equals(other.tests[split].image):
                raise FishcompError(f"ensemble members {names[0]} and {name} predicted different {split} images")


@register_stage
class Ensemble(Stage):
    name = "ensemble"
    section = "ensemble"
    declares = ("ensemble",)
    summary = "the members' predictions blended (given or fitted weights, cross-fitted estimate)"
    saves_config = True

    def inputs(self, resolver: Resolver, loaded: LoadedConfig, **request) -> dict:
        return {"members": [resolver.node("train", member, via="ensemble.members") for member in resolver.members(loaded)]}

    def references(self, resolver: Resolver, node: Node) -> dict:
        kept, _ = resolver.ensemble_members(node.loaded)
        trained = dict(zip((id(entry) for entry, _ in kept), node.inputs["members"]))
        return {f"ensemble.members.{i}.config": trained.get(id(entry), node.loaded.path.parent / entry.config)
                for i, entry in enumerate(node.loaded.config.ensemble.members)}

    def params(self, ctx: Context, loaded: LoadedConfig, **request) -> dict:
        # The blend's fold copies (`calibrate` reads their spread) and its cross-fitted rows
        # (`calibrate` scores on them) came later than the blend: a blend built without them is
        # rebuilt, which takes seconds, rather than read without them.
        # The members are their nodes' keys (the inputs), not the files that name them: a saved
        # config names them by their artifacts' saved configs, a renamed file is the same member.
        # Their weights in the order of those inputs, so that which of them the data could train
        # is part of the key too.
        kept, _ = Resolver(ctx).ensemble_members(loaded)
        settings = {**key_payload(loaded.config.ensemble), "members": [entry.weight for entry, _ in kept]}
        return {"ensemble": settings, "writes": ["test_folds", "cross_fitted"]}

    def build(self, ctx: Context, node: Node, inputs: dict, tmp: Path) -> dict | None:
        # The same sorting that chose the input nodes, so the kept entries line up with them.
        resolver = Resolver(ctx)
        kept, skipped = resolver.ensemble_members(node.loaded)
        return _build(node.loaded, [config for _, config in kept], [entry.weight for entry, _ in kept], inputs["members"], tmp,
                      [{"name": config.name, "skipped": reason} for config, reason in skipped],
                      BuildSeconds(resolver, node.inputs["members"]))

    def describe(self, artifact: Artifact) -> str:
        summary = json.loads(artifact.file("summary.json").read_text())
        scores = ", ".join(f"{m['name']} {m['valid_logloss']:.4f} x{m['weight']:.2f}" for m in summary["members"])
        honest = summary.get("valid_logloss_cross_fitted")
        crossed = f", cross-fitted {honest:.4f}" if honest is not None else ""
        versus = summary.get("versus_best_member")
        if versus is not None:
            words = {"B better": "the blend better", "A better": f"{versus['member']} better", "within noise": "within noise"}
            crossed += (f", {versus['difference']:+.4f} [{versus['low']:+.4f}, {versus['high']:+.4f}] against {versus['member']} alone"
                        f" ({words[difference_verdict(versus)]})")
        left_out = "".join(f"; {m['name']} skipped" for m in summary.get("skipped", []))
        idle = summary.get("at_weight_zero")
        if idle and idle["members"]:
            left_out += f"; at weight 0: {', '.join(idle['members'])}, {idle['seconds_own']:.0f} s to build what only they need"
        return f"blend ({summary.get('blend', summary['weights'])}) {summary['valid_logloss']:.4f}{crossed} ({scores}{left_out})"


class BuildSeconds:
    """What the members took to build, from their artifacts' manifests (an artifact without a
    record counts 0). An artifact several members read (a backbone pass serving several) is
    paid while any of them stays in the config."""

    def __init__(self, resolver: Resolver, members: list[Node]):
        self.needs = [{(n.stage.name, n.key) for n in resolver.walk(member)} for member in members]
        self.seconds = {found: resolver.ctx.cache.seconds(*found) or 0.0 for found in set().union(*self.needs)}

    def only(self, chosen: list[int]) -> float:
        """Seconds of what no member outside `chosen` needs: what leaving them all out saves."""
        theirs = set().union(*(self.needs[i] for i in chosen))
        others = set().union(*(needs for j, needs in enumerate(self.needs) if j not in chosen))
        return sum(self.seconds[f] for f in theirs - others)

    def of_member(self, i: int) -> dict:
        own = self.only([i])
        return {"seconds_own": round(own, 1), "seconds_shared": round(sum(self.seconds[f] for f in self.needs[i]) - own, 1)}


def _blend_per_fold(predictions: list[Predictions], combine) -> dict[str, np.ndarray]:
    """Fold f's blend of the members' fold-f test predictions: what each out-of-fold row's blend is
    made of (`calibrate` reads their spread). Empty for a split some member kept no fold copies of."""
    per_fold = {}
    for split in predictions[0].tests:
        stacks = [p.test_folds.get(split) for p in predictions]
        if any(s is None for s in stacks) or len({s.shape for s in stacks}) > 1:
            continue
        per_fold[split] = np.stack([combine([s[fold] for s in stacks]) for fold in range(len(stacks[0]))])
    return per_fold


def _fold_mean_gain(predictions: Predictions) -> float | None:
    stacks = list(predictions.test_folds.values())
    if not stacks or len(stacks) != len(predictions.tests) or len({s.shape[0] for s in stacks}) > 1:
        return None
    return fold_mean_gain(np.concatenate(stacks, axis=1))


def choose_blend(config, rows: list[np.ndarray], labels: np.ndarray, folds: np.ndarray) -> tuple[str, dict, float | None, np.ndarray | None]:
    """Which blend to use, each candidate's cross-fitted log loss, the chosen one's, and its
    cross-fitted rows (None where nothing is fitted or there is one fold only)."""
    def cross_fitted(kind: str) -> np.ndarray | None:
        if kind == "stack":
            return cross_fitted_stack(rows, labels, folds, config.stack_strength)
        return cross_fitted_blend(rows, labels, folds, config.method, kind)

    if config.weights == "given":
        return "given", {}, None, None
    kinds = ["fitted", "selection", "stack"] if config.weights == "auto" else [config.weights]
    estimates = {kind: cross_fitted(kind) for kind in kinds}
    candidates = {kind: None if rows_ is None else log_loss(labels, rows_) for kind, rows_ in estimates.items()}
    if config.weights == "stack" and estimates["stack"] is None:
        raise FishcompError("ensemble.weights: stack learns from each fold's out-of-fold rows with a stacker fitted on the other folds, "
                            "and a hold-out split has one fold: use fitted or selection, or split.kind: kfold")
    if config.weights == "auto" and any(v is None for v in candidates.values()):
        return "fitted", candidates, candidates["fitted"], estimates["fitted"]  # a hold-out split cannot cross-fit: no stacking
    kind = min(candidates, key=lambda k: candidates[k]) if config.weights == "auto" else config.weights
    return kind, candidates, candidates[kind], estimates[kind]


def versus_best_member(names: list[str], rows: list[np.ndarray], honest: np.ndarray | None, labels: np.ndarray) -> dict | None:
    """The blend's honest out-of-fold rows (cross-fitted, or given weights, which fit nothing)
    against its best member's, paired image by image: whether the blend earns its members
    beyond noise. None where no honest rows exist (fitted weights on a hold-out split)."""
    if honest is None:
        return None
    member_losses = [image_log_losses(labels, r) for r in rows]
    best = int(np.argmin([losses.mean() for losses in member_losses]))
    return {"member": names[best], **paired_difference(member_losses[best], image_log_losses(labels, honest))}


def _build(loaded: LoadedConfig, members: list[LoadedConfig], weights: list[float], trained: list[Artifact], tmp: Path, skipped: list[dict],
           costs: BuildSeconds) -> dict:
    config = loaded.config.ensemble
    names = [m.name for m in members]
    predictions = [read_predictions(a) for a in trained]
    _check_aligned(names, predictions)
    first = predictions[0]
    classes = first.classes
    member_oof = [p.oof[classes].to_numpy(dtype=np.float64) for p in predictions]
    validated = (first.oof.fold >= 0).to_numpy()
    labels, folds = first.oof.label.to_numpy(), first.oof.fold.to_numpy()
    if config.weights == "given" and sum(weights) <= 0:
        raise FishcompError(f"{loaded.path}: the members left after skipping have no weight; give them a positive `weight` or use weights: auto")
    rows = [p[validated] for p in member_oof]
    kind, candidates, cross_fitted, honest = choose_blend(config, rows, labels[validated], folds[validated])
    test_probs = {split: [p.tests[split][classes].to_numpy(dtype=np.float64) for p in predictions] for split in first.tests}
    oof = first.oof.copy()
    tests = {split: frame.copy() for split, frame in first.tests.items()}
    if kind == "stack":
        stacker = fit_stacker(rows, labels[validated], config.stack_strength)
        # Out of fold, each fold comes from a stacker that never saw it: the honest number.
        stacked = oof[classes].to_numpy(dtype=np.float64, copy=True)
        stacked[validated] = honest
        oof[classes] = stacked
        for split in tests:
            tests[split][classes] = stack_predict(stacker, test_probs[split], len(classes))
        combine = partial(stack_predict, stacker, classes=len(classes))
        coefficients = np.abs(stacker.coef_).reshape(len(stacker.coef_), len(rows), -1).sum(axis=(0, 2))
        weights = (coefficients / coefficients.sum()).tolist()  # each member's share of the stacker's weight
    else:
        if kind in WEIGHT_FITTERS:
            weights = WEIGHT_FITTERS[kind](rows, labels[validated], config.method).tolist()
        oof[classes] = blend(member_oof, weights, config.method)
        for split in tests:
            tests[split][classes] = blend(test_probs[split], weights, config.method)
        combine = partial(blend, weights=weights, method=config.method)
    stale = [a.path for a, p in zip(trained, predictions) if p.validated.fold.nunique() > 1 and not p.test_folds]
    if stale:
        warn(
            f"ensemble   [{loaded.name}] {len(stale)} member(s) were trained before fishcomp kept each fold model's test predictions "
            f"(e.g. {stale[0]}), so `calibrate` cannot scale the test temperature for the mean of the folds; "
            "for that, delete them and the blend printed below, and run again"
        )
    # Given weights fit nothing on the out-of-fold rows: they are their own cross-fitted rows.
    honest_rows = oof[classes].to_numpy()[validated] if kind == "given" else honest
    blended = Predictions(classes=classes, oof=oof, tests=tests, test_folds=_blend_per_fold(predictions, combine)).with_cross_fitted(honest_rows)
    blended.write(tmp)
    shares = [weight / sum(weights) for weight in weights]
    idle = [i for i, share in enumerate(shares) if round(share, 2) == 0]  # 0.00 as printed
    summary = {
        "name": loaded.name,
        "method": config.method,
        "weights": config.weights,
        "members": [
            {
                "name": name, "weight": share, "valid_logloss": p.oof_logloss(), "valid_accuracy": p.oof_accuracy(),
                # What out of fold cannot see: the test rows' fold mean beats one fold model by
                # about this much (label-free; None without fold copies of every test split).
                "fold_mean_gain": _fold_mean_gain(p),
                # Its build seconds: what only it needs (leaving it out saves that), and the rest.
                **costs.of_member(i),
                "artifact": artifact.path.name,
            }
            for i, (name, share, p, artifact) in enumerate(zip(names, shares, predictions, trained))
        ],
        # The members this blend does not use, and what leaving them all
        # out of the config saves on a fresh run: the cheaper pipeline for data like this.
        "at_weight_zero": {"members": [names[i] for i in idle], "seconds_own": round(costs.only(idle), 1)},
        # Members the data could not train (with why): listed, not silently left out.
        "skipped": skipped,
        "blend": kind,
        "valid_logloss": blended.oof_logloss(),
        # Each fold blended by weights (or a stacker) fitted on the other folds only.
        "valid_logloss_cross_fitted": cross_fitted,
        "candidates_cross_fitted": candidates,
        # B = the blend, A = its best member alone (`fishcomp diff`'s numbers).
        "versus_best_member": versus_best_member(names, rows, honest_rows, labels[validated]),
        "valid_accuracy": blended.oof_accuracy(),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary}
