"""`fishcomp report`: PNG figures and one static `index.html` for runs and for the dataset.

Runs are named by config file (built first if not cached) or by artifact folder. Everything is
computed from the artifacts' own files (summary.json, metrics.csv, oof.csv, checkpoints), so the
page shows exactly what the runs recorded.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp import viz
from fishcomp.boxes import box_iou, nearest_fish_iou
from fishcomp.cache import Artifact, write_atomic
from fishcomp.config import (
    LoadedConfig,
    RunConfig,
    SplitConfig,
    load_config,
)
from fishcomp.console import info, progress
from fishcomp.context import Context, resolve_device
from fishcomp.data.images import UnreadableImage, load_rgb, size_labels
from fishcomp.data.splits import assign_folds
from fishcomp.errors import FishcompError
from fishcomp.features import BOX_COLUMNS, every_fish_boxes, load_index, normalised_boxes
from fishcomp.metrics import attention_scores, image_log_losses, per_class_scores, size_only_log_loss
from fishcomp.models.heads import list_heatmap_heads
from fishcomp.predictions import read_predictions

TOP_LOSSES = 12
SAMPLES = 8


@dataclass
class Section:
    title: str
    numbers: dict[str, str] = field(default_factory=dict)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name relative to the page, caption)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- resolving what to report ---------------------------------------------------------------------


@dataclass
class Run:
    loaded: LoadedConfig
    artifact: Artifact
    stage: str  # train or ensemble
    members: list[Run] = field(default_factory=list)
    calibration: Artifact | None = None  # the calibrate stage's, when the config has one


def _artifact(path: Path) -> Artifact:
    return Artifact(stage=path.parent.name, key=path.name.rsplit("-", 1)[-1], path=path, built=False)


def _resolve(ctx: Context, spec: str) -> Run:
    from fishcomp.pipeline import resolver

    path = Path(spec)
    if path.is_dir():
        if not (path / "manifest.json").is_file() or path.parent.name not in ("train", "ensemble"):
            raise FishcompError(f"{path}: not a finished train or ensemble artifact (expected <work>/train/<name>-<key>/)")
        artifact = _artifact(path)
        config = RunConfig.model_validate(_read_yaml(path / "config.yaml"))
        loaded = LoadedConfig(config=config, path=path / "config.yaml")
        members = []
        if artifact.stage == "ensemble":
            summary = json.loads(artifact.file("summary.json").read_text())
            for member in summary["members"]:
                folder = path.parent.parent / "train" / member.get("artifact", "")
                if member.get("artifact") and folder.is_dir():
                    members.append(_resolve(ctx, str(folder)))
        return Run(loaded, artifact, artifact.stage, members)
    if path.suffix not in (".yaml", ".yml"):
        raise FishcompError(f"{spec}: name a run by its config file (.yaml) or its artifact folder")
    loaded = load_config(path, ctx.overrides)
    plan = resolver(ctx)
    calibration = plan.build(plan.node("calibrate", loaded)) if loaded.config.calibrate is not None else None
    if loaded.config.ensemble is not None:
        node = plan.node("ensemble", loaded)
        blend = plan.build(node)  # trains its members first
        return Run(loaded, blend, "ensemble", [Run(m.loaded, plan.build(m), "train") for m in node.inputs["members"]], calibration)
    return Run(loaded, plan.build(plan.node("train", loaded)), "train", calibration=calibration)


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# -- sections -------------------------------------------------------------------------------------


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}" if isinstance(value, float) else str(value)


def _photo(root: Path, relative: str):
    try:
        return load_rgb(root / relative, target=(480, 270))[0]
    except UnreadableImage:
        return None


def train_section(ctx: Context, run: Run, out: Path, prefix: str) -> Section:
    artifact, summary = run.artifact, json.loads(run.artifact.file("summary.json").read_text())
    section = Section(title=f"run {summary['name']} ({summary['head']}, {'x'.join(map(str, summary['input_size']))})")
    section.numbers = {
        "artifact": str(artifact.path),
        "valid log loss": _fmt(summary["valid_logloss"]),
        "valid accuracy": _fmt(summary["valid_accuracy"]),
        "prior log loss": _fmt(summary["prior_logloss"]),
    }
    if summary.get("tta_views", 1) > 1:
        section.numbers["valid log loss without TTA"] = _fmt(summary["valid_logloss_without_tta"])
    for key in ("valid_iou", "valid_pointing"):
        if key in summary:
            section.numbers[key.replace("_", " ")] = _fmt(summary[key])
    metrics = pd.read_csv(artifact.file("metrics.csv"))
    section.figures.append((viz.training_curves(metrics, out / f"{prefix}curves.png").name, "training curves per fold"))
    if summary.get("stopping"):
        section.tables.append((f"training per fold (epoch chosen on: {summary.get('epochs_chosen_on', '-')})", _stopping_table(summary["stopping"])))

    predictions = read_predictions(artifact)
    validated = predictions.validated
    labels, probs = predictions.oof_labels(), predictions.oof_probs()
    classes = predictions.classes
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(matrix, (labels, probs.argmax(axis=1)), 1)
    section.figures.append((viz.confusion_matrices(matrix, classes, out / f"{prefix}confusion.png").name, "out-of-fold confusion matrix"))
    section.tables.append(("per class, out of fold", pd.DataFrame(per_class_scores(labels, probs, classes))))

    paths = ctx.dataset().images.set_index("image").path
    losses = image_log_losses(labels, probs)
    worst = np.argsort(-losses)[:TOP_LOSSES]
    panels = []
    for i in worst:
        image = validated.image.iloc[i]
        photo = _photo(ctx.data_dir, paths.get(image, ""))
        if photo is not None:
            guess = int(probs[i].argmax())
            panels.append((photo, f"{image}: true {classes[labels[i]]}, said {classes[guess]} {probs[i, guess]:.2f} (loss {losses[i]:.2f})", []))
    if panels:
        section.figures.append((viz.image_grid(panels, out / f"{prefix}top_losses.png").name, "validation images with the highest loss"))

    if artifact.file("oof_boxes.csv").is_file():
        _box_figures(ctx, run, out, prefix, section, paths)
    if summary.get("inputs", {}).get("features", {}).get("stage") == "crops":
        _crop_sheet(ctx, artifact, summary, validated, labels, probs, classes, out, prefix, section, paths)
    if run.loaded.config.head is not None and run.loaded.config.head.kind in list_heatmap_heads():
        _attention(ctx, run, out, prefix, section)
    return section


def _stopping_table(stopping: list[dict]) -> pd.DataFrame:
    """Per fold: how far it trained, and whether it ended converged or short of epochs."""
    return pd.DataFrame([{
        "fold": f["fold"], "epochs run": f["epochs_run"], "lowest validation log loss at epoch": f["best_epoch"],
        "epoch kept": f.get("kept_epoch", f["best_epoch"]),
        "ended": "early stopping" if f["stopped_early"] else "converged" if f["converged"] else "ran out of epochs",
    } for f in stopping])


def _features(ctx: Context, run: Run) -> Artifact:
    """The features a train run read, by the key its summary recorded."""
    features = json.loads(run.artifact.file("summary.json").read_text()).get("inputs", {}).get("features", {})
    found = ctx.cache.find(features.get("stage", "precompute"), features.get("key", "-"))
    if found is None:
        raise FishcompError(f"{run.artifact.path}: its features are no longer in {ctx.work_dir}; run the config again")
    return _artifact(found)


def _box_figures(ctx: Context, run: Run, out: Path, prefix: str, section: Section, paths) -> None:
    index = load_index(_features(ctx, run)).set_index("image")
    predicted = pd.read_csv(run.artifact.file("oof_boxes.csv")).set_index("image")
    train = index.loc[predicted.index]
    truth = normalised_boxes(train.reset_index())
    guess = predicted[BOX_COLUMNS].to_numpy(dtype=np.float32)
    have = ~np.isnan(truth).any(axis=1) & ~np.isnan(guess).any(axis=1)
    if not have.any():
        return
    ious = box_iou(guess[have], truth[have])
    section.numbers["mean box IoU (validation images with a box)"] = _fmt(float(ious.mean()))
    # A box on another fish of the photo is a fish found (and the crops' classifier sees one):
    # each box's IoU with the nearest annotated fish too, the largest among them.
    every_fish = every_fish_boxes(train.reset_index(), ctx.annotations(run.loaded.config.data))[have]
    nearest = nearest_fish_iou(guess[have], every_fish)
    section.numbers["mean box IoU with the nearest annotated fish"] = _fmt(float(nearest.mean()))
    section.figures.append((viz.histogram(nearest, out / f"{prefix}iou.png", "box IoU with the nearest fish, validation", "IoU").name, "IoU histogram"))
    panels = []
    for image, fish, box, iou in list(zip(predicted.index[have], every_fish, guess[have], nearest))[:SAMPLES]:
        photo = _photo(ctx.data_dir, paths.get(image, ""))
        if photo is not None:
            panels.append((photo, f"{image}: IoU {iou:.2f}", [*((f, "lime") for f in fish if not np.isnan(f).any()), (box, "red")]))
    section.figures.append((viz.image_grid(panels, out / f"{prefix}boxes_valid.png").name, "validation: annotated fish green, predicted box red"))
    for split in ("test_stg1", "test_stg2"):
        if run.artifact.file(f"{split}_boxes.csv").is_file():
            test = pd.read_csv(run.artifact.file(f"{split}_boxes.csv")).head(SAMPLES)
            panels = []
            for row in test.itertuples(index=False):
                photo = _photo(ctx.data_dir, paths.get(row.image, ""))
                if photo is not None:
                    panels.append((photo, row.image, [(np.array([row.box_x, row.box_y, row.box_w, row.box_h]), "red")]))
            section.figures.append((viz.image_grid(panels, out / f"{prefix}boxes_{split}.png").name, f"{split}: predicted boxes"))
            break


def _crop_sheet(ctx: Context, trained: Artifact, summary: dict, validated, labels, probs, classes, out: Path, prefix: str, section: Section, paths) -> None:
    """Detect-then-classify runs: the crops the classifier saw on validation images, true vs
    predicted class, and its log loss next to the whole-image model's."""
    from PIL import Image

    blend = summary.get("nof_blend")
    if blend:
        section.numbers["crop classifier alone, valid log loss"] = _fmt(blend["crops_alone"])
        section.numbers[f"whole-image model ({blend['whole']}), valid log loss"] = _fmt(blend["whole_image"])
        section.numbers[f"blended (whole image's P(NoF) at weight {blend['weight']})"] = _fmt(blend["blended"])
    mixed = summary.get("candidates")
    if mixed:
        # Before the NoF blend, both: what the further boxes bought.
        section.numbers["the usual crop alone (before the NoF blend), valid log loss"] = _fmt(mixed["usual_crop_alone"])
        section.numbers[f"with {mixed['count'] - 1} further boxes mixed in at share {mixed['share']:g}, valid log loss"] = _fmt(mixed["mixed"])
        if mixed.get("usual_crop_weight") is not None:
            by = {"fish": "times each crop's P(fish)", "fish_class": "times each crop's most probable fish class's probability"}.get(mixed.get("weights"), "alone")
            section.numbers[f"the usual crop's mean share of the mixture, out of fold (by the cells' probabilities {by})"] = _fmt(mixed["usual_crop_weight"])
    found = ctx.cache.find("crops", summary["inputs"]["features"]["key"])
    if found is None:
        return
    rectangles = pd.read_csv(found / "crop_boxes.csv")
    rectangles = rectangles[(rectangles.split == "train") & (rectangles["copy"] == 0)].set_index("image")
    panels = []
    for i in range(min(SAMPLES * 2, len(validated))):
        image = validated.image.iloc[i]
        if image not in rectangles.index or np.isnan(rectangles.loc[image, "w"]):
            continue
        try:
            photo, _ = load_rgb(ctx.data_dir / paths.get(image, ""))
        except UnreadableImage:
            continue
        x, y, w, h = rectangles.loc[image, ["x", "y", "w", "h"]]
        crop = photo.crop((round(x), round(y), round(x + w), round(y + h))).resize((192, 192), Image.BILINEAR)
        guess = int(probs[i].argmax())
        panels.append((crop, f"true {classes[labels[i]]}, said {classes[guess]} {probs[i, guess]:.2f}", []))
    if panels:
        section.figures.append((viz.image_grid(panels, out / f"{prefix}crops.png", columns=6).name, "crops of validation images (out-of-fold boxes): true vs predicted class"))
    if mixed:
        _candidate_boxes(ctx, found, trained, paths, out, prefix, section)


def _candidate_boxes(ctx: Context, found: Path, trained: Artifact, paths: dict, out: Path, prefix: str, section: Section) -> None:
    """The photos with a fish whose usual crop weighed least in their out-of-fold mixture: every
    box cut, the usual one green, the further ones orange, with each one's share of the mixture
    (the crop classifier's `oof_candidate_shares.npy`; the cells' shares for a run without it)."""
    from fishcomp.training.candidates import candidate_shares

    table = pd.read_csv(found / "crop_boxes.csv")
    train = pd.read_csv(found / "index.csv")
    train = train[train.split == "train"].reset_index(drop=True)
    classes = json.loads((found / "meta.json").read_text())["classes"]
    weights = np.load(found / "train_candidate_weights.npy")
    shares = candidate_shares(weights)
    mixed = trained.file("oof_candidate_shares.npy")
    if mixed.is_file():  # rows as oof.csv's: the readable train images
        order = pd.Series(np.arange(len(train)), index=train.image)[pd.read_csv(trained.file("oof.csv")).image].to_numpy()
        shares = np.full(shares.shape, np.nan)
        shares[order] = np.load(mixed)
    cut = table[table.split == "train"]
    usual = cut[cut["copy"] == 0].set_index("image")
    further = cut[cut.source.str.startswith("candidate")]
    # Empty decks are where it is least sure anyway: the photos with a fish say more.
    with_fish = train.label.to_numpy() != (classes.index("NoF") if "NoF" in classes else -1)
    panels = []
    for row in [r for r in np.argsort(shares[:, 0], kind="stable") if with_fish[r] and not np.isnan(shares[r, 0])][:SAMPLES]:
        image = train.image[row]
        try:
            photo, (width, height) = load_rgb(ctx.data_dir / paths.get(image, train.path[row]))
        except UnreadableImage:
            continue
        scale = np.array([width, height, width, height], dtype=float)
        boxes = [(usual.loc[image, ["x", "y", "w", "h"]].to_numpy(dtype=float) / scale, "lime")]
        boxes += [(box / scale, "orange") for box in further[further.image == image][["x", "y", "w", "h"]].to_numpy(dtype=float) if not np.isnan(box).any()]
        # In the order the crops were cut: the usual one, then the further ones.
        shown = " / ".join(f"{share:.2f}" for share in shares[row]) if weights[row].any() else "no cell map"
        panels.append((photo, f"{image} ({classes[int(train.label[row])]}): shares {shown}", boxes))
    if panels:
        section.figures.append((viz.image_grid(panels, out / f"{prefix}candidates.png", columns=4).name,
                                "the photos with a fish whose usual crop weighed least in their mixture: the usual crop (green) and the further ones (orange), "
                                "with each one's share of the photo's out-of-fold mixture"))


def _attention(ctx: Context, run: Run, out: Path, prefix: str, section: Section) -> None:
    """The attention-vs-box score, over every validation image with a box."""
    from fishcomp.commands.heatmap import candidates, class_maps, draw_heatmaps
    features = _features(ctx, run)
    chosen = candidates(run.artifact, features, "valid")
    boxes = normalised_boxes(chosen)
    boxed = chosen[~np.isnan(boxes).any(axis=1)].reset_index(drop=True)
    if boxed.empty:
        section.notes.append("no validation image has a box: no attention score")
        return
    probs, maps = class_maps(run.artifact, features, "valid", boxed, resolve_device("cpu"))
    scores = attention_scores(maps, normalised_boxes(boxed))
    section.numbers.update(
        {
            "attention: heatmap peak inside the box (pointing)": _fmt(scores["pointing"]),
            "attention: share of heatmap mass inside the box": _fmt(scores["mass"]),
            "attention: chance (mean box area / image area)": _fmt(scores["chance"]),
            "attention: images with a box": str(scores["images"]),
        }
    )
    classes = json.loads(features.file("meta.json").read_text())["classes"]
    folder = out / f"{prefix}heatmaps"
    _, grid = draw_heatmaps(ctx.data_dir, classes, "valid", boxed.head(SAMPLES), probs[:SAMPLES], maps[:SAMPLES], folder)
    section.figures.append((f"{folder.name}/{grid.name}", "predicted-class heatmaps on validation images (true box green)"))


def ensemble_section(run: Run, out: Path, prefix: str) -> Section:
    summary = json.loads(run.artifact.file("summary.json").read_text())
    section = Section(title=f"ensemble {summary['name']} ({summary['method']}, weights {summary.get('weights', 'given')})")
    section.numbers = {"artifact": str(run.artifact.path), "blend valid log loss": _fmt(summary["valid_logloss"])}
    if summary.get("valid_logloss_cross_fitted") is not None:
        section.numbers["blend with weights fitted on the other folds"] = _fmt(summary["valid_logloss_cross_fitted"])
    versus = summary.get("versus_best_member")
    if versus is not None:
        section.numbers[f"that blend minus {versus['member']} alone, per image (95 % interval)"] = (
            f"{versus['difference']:+.4f} [{versus['low']:+.4f}, {versus['high']:+.4f}]")
    idle = summary.get("at_weight_zero")
    if idle and idle["members"]:
        section.numbers["members at weight 0, and the seconds of what only they need (leaving them out saves it)"] = (
            f"{', '.join(idle['members'])}: {idle['seconds_own']:.0f} s")
    members = summary["members"]
    section.tables.append(("members", pd.DataFrame(members).drop(columns=["artifact"], errors="ignore")))
    if summary.get("skipped"):
        section.tables.append(("members skipped", pd.DataFrame(summary["skipped"])))
    names = [m["name"] for m in members] + ["blend"]
    values = [m["valid_logloss"] for m in members] + [summary["valid_logloss"]]
    section.figures.append((viz.bar_chart(names, values, out / f"{prefix}members.png", "out-of-fold log loss", highlight="blend").name, "members vs blend"))
    if len(run.members) > 1:
        predictions = [read_predictions(m.artifact) for m in run.members]
        flat = np.stack([p.oof_probs().ravel() for p in predictions])
        corr = np.corrcoef(flat)
        labels = [json.loads(m.artifact.file("summary.json").read_text())["name"] for m in run.members]
        section.figures.append(
            (viz.matrix_plot(corr, labels, labels, out / f"{prefix}correlation.png", "correlation of out-of-fold probabilities").name, "member correlation")
        )
    return section


def calibration_section(run: Run, out: Path, prefix: str) -> Section:
    summary = json.loads(run.calibration.file("summary.json").read_text())
    shift = " and a per-class shift" if summary.get("bias") else ""
    section = Section(title=f"calibration of {summary['name']} (a temperature{shift}, fitted out of fold)")
    section.numbers = {
        "calibration artifact": str(run.calibration.path),
        "temperature": f"{summary['temperature']:.3f}",
        "valid log loss before calibration": _fmt(summary["valid_logloss_before"]),
        "calibrated valid log loss": _fmt(summary["valid_logloss"]),
    }
    # Each fold calibrated by a fit on the other folds, for each kind `bias: auto` chose between.
    for kind, score in summary["cross_fitted_by_kind"].items():
        section.numbers[f"cross-fitted, {kind.replace('_', ' ')}"] = _fmt(score)
    if summary.get("bias"):
        # The shift the classes got: a blend leaning to the common classes gets them lowered.
        section.numbers["per-class shift of the log-probabilities"] = ", ".join(f"{c} {v:+.2f}" for c, v in summary["bias"].items())
    for split, temperature in summary.get("test_temperatures", {}).items():
        # A test row is the mean of the fold models, which earns a lower temperature than one of them.
        section.numbers[f"{split} temperature (for the mean of the fold models)"] = f"{temperature:.3f}"
    before, after = read_predictions(run.artifact), read_predictions(run.calibration)
    curves = {"before": (before.oof_labels(), before.oof_probs()), f"T={summary['temperature']:.2f}{shift}": (after.oof_labels(), after.oof_probs())}
    section.figures.append((viz.reliability_diagram(curves, out / f"{prefix}reliability.png", "out of fold").name, "confidence against accuracy"))
    return section


def _looks_like_night(photo) -> bool:
    """Night infrared frames are dark and nearly colourless (or green-tinted)."""
    array = np.asarray(photo.resize((64, 36)), dtype=np.float32)
    brightness = array.mean()
    red, green, blue = array[..., 0].mean(), array[..., 1].mean(), array[..., 2].mean()
    saturation = (array.max(axis=2) - array.min(axis=2)).mean()
    return brightness < 90 and (saturation < 20 or green > (red + blue) / 2 + 12)


def dataset_section(ctx: Context, out: Path) -> Section:
    dataset = ctx.dataset()
    train = dataset.images[dataset.images.split == "train"].reset_index(drop=True)
    classes = dataset.classes
    section = Section(title=f"dataset {dataset.root}")
    counts = train.label.value_counts().reindex(range(len(classes)), fill_value=0).to_numpy()
    section.figures.append((viz.bar_chart(classes, counts.astype(float).tolist(), out / "data_classes.png", "train images per class").name, "class counts"))
    nights = []
    with progress("report: reading image sizes", len(train)) as advance:
        train["size"] = size_labels(dataset.root, train.path, advance)
    table = pd.crosstab(train["size"], train.label.map(lambda i: classes[i])).reindex(columns=classes, fill_value=0)
    section.tables.append(("train image size x class (size identifies the boat)", table.reset_index()))
    section.figures.append(
        (viz.matrix_plot(table.to_numpy(dtype=float), list(table.index), classes, out / "data_size_class.png", "images per size and class", fmt="{:.0f}").name, "size x class")
    )
    folds = assign_folds(train.label.to_numpy(), SplitConfig(kind="kfold", folds=5))
    by_size, prior = size_only_log_loss(train.label.to_numpy(), train["size"].to_numpy(), folds, len(classes))
    section.numbers = {
        "train images": str(len(train)),
        "log loss from image size alone (5-fold)": _fmt(by_size),
        "log loss of the class prior (same folds)": _fmt(prior),
    }
    annotations = ctx.annotations(RunConfig().data)
    boxed = train.image.map(lambda name: annotations.largest(name) is not None)
    coverage = boxed.groupby(train.label.map(lambda i: classes[i])).mean().reindex(classes)
    section.tables.append(("share of train images with an annotated box", coverage.rename("with box").reset_index().rename(columns={"label": "class"})))
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        mine = train[train.label == index]
        if mine.empty:
            continue
        picked = mine.iloc[rng.permutation(len(mine))[:SAMPLES]]
        panels = []
        for row in picked.itertuples(index=False):
            photo = _photo(dataset.root, row.path)
            if photo is not None:
                panels.append((photo, f"{row.image} ({row.size})", []))
                nights.append(_looks_like_night(photo))
        if panels:
            section.figures.append((viz.image_grid(panels, out / f"data_contact_{name}.png").name, f"contact sheet: {name}"))
    if nights:
        section.numbers["night share (estimated on the contact-sheet images)"] = f"{np.mean(nights):.2f}"
    return section


# -- the page -------------------------------------------------------------------------------------


def leaderboard_section(work: Path, out: Path) -> Section | None:
    """The leaderboard scores `fishcomp lb` recorded, against the out-of-fold estimates: the plot
    Kaggle competitors keep by hand. None without any."""
    from fishcomp.commands.leaderboard import agreement, scores

    table = scores(work)
    scored = table.dropna(subset=["valid_logloss", "public"])
    if scored.empty:
        return None
    section = Section(title=f"leaderboard ({len(scored)} scored submissions)")
    said = agreement(table)
    if said is not None:
        section.notes.append(said)
    section.tables.append(("scores", table))
    names = [f"{name}-{key[:4]}" for name, key in zip(scored.name, scored.key)]
    figure = viz.score_scatter(scored.valid_logloss.astype(float).tolist(), scored.public.astype(float).tolist(), names, out / "leaderboard.png",
                               "public leaderboard against out of fold", "out-of-fold log loss (clipped)", "public log loss")
    section.figures.append((figure.name, "each submission's public score against its out-of-fold estimate; on the dashed line they agree"))
    return section


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0, classes="table")


def write_page(sections: list[Section], out: Path) -> Path:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fishcomp report</title><style>",
        "body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em} img{max-width:100%;border:1px solid #ddd}"
        " table{border-collapse:collapse;margin:.5em 0} td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}"
        " dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px} dt{color:#555}",
        "</style></head><body><h1>fishcomp report</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><dl>")
        for name, value in section.numbers.items():
            parts.append(f"<dt>{html.escape(name)}</dt><dd class='number' data-name='{html.escape(name)}'>{html.escape(value)}</dd>")
        parts.append("</dl>")
        for note in section.notes:
            parts.append(f"<p>{html.escape(note)}</p>")
        for caption, frame in section.tables:
            parts.append(f"<h3>{html.escape(caption)}</h3>{_table_html(frame)}")
        for name, caption in section.figures:
            parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    page = out / "index.html"
    write_atomic(page, "\n".join(parts))
    return page


def report(ctx: Context, specs: list[str], out: Path, include_dataset: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sections = [dataset_section(ctx, out)] if include_dataset else []
    seen: set[Path] = set()
    for spec in specs:
        run = _resolve(ctx, spec)
        for item in [run, *run.members]:
            if item.artifact.path in seen:
                continue
            seen.add(item.artifact.path)
            prefix = f"{item.artifact.path.name}_"
            if item.stage == "ensemble":
                sections.append(ensemble_section(item, out, prefix))
            else:
                sections.append(train_section(ctx, item, out, prefix))
            if item.calibration is not None:
                sections.append(calibration_section(item, out, prefix))
    board = leaderboard_section(ctx.work_dir, out)
    if board is not None:
        sections.append(board)
    page = write_page(sections, out)
    info(f"report     wrote   {page}")
    return page
