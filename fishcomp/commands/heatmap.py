"""`fishcomp heatmap`: where a class-map head looks, as PNG overlays on the original photos.

For a validation image the map comes from the fold model that did not train on it (the honest
view); for a test image, the fold models' maps are averaged. The map shown is the predicted
class's, upsampled onto the full photo, with the annotated box (when there is one) in green.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig
from fishcomp.console import info, warn
from fishcomp.context import Context, resolve_device
from fishcomp.data.images import UnreadableImage, load_rgb
from fishcomp.errors import FishcompError
from fishcomp.features import load_features, load_index, normalised_boxes
from fishcomp.models.heads import list_heatmap_heads
from fishcomp.models.losses import pointing_hits
from fishcomp.training.data import size_onehot
from fishcomp.training.feature_sets import FeatureSet, predict
from fishcomp.training.folds import load_fold_model
from fishcomp.viz import heatmap_grid, heatmap_overlay

SPLITS = ("valid", "test_stg1", "test_stg2")
# The `fold` of a test image that was unreadable when its features were computed.
UNREADABLE = -2


def candidates(trained: Artifact, features: Artifact, split: str) -> pd.DataFrame:
    """The images of a split that can be drawn, with their feature `row` and the `fold` whose model
    predicts them (-1: every fold's model, averaged; UNREADABLE: none, it could not be decoded)."""
    index = load_index(features)
    source = "train" if split == "valid" else split
    split_index = index[index.split == source].reset_index(drop=True)
    if split_index.empty:
        raise FishcompError(f"the data has no {source} images")
    split_index["row"] = np.arange(len(split_index))
    if split == "valid":
        oof = pd.read_csv(trained.file("oof.csv"))[["image", "fold"]]
        merged = split_index.merge(oof[oof.fold >= 0], on="image", how="left")
        merged.loc[~merged.ok.astype(bool), "fold"] = UNREADABLE
        return merged.dropna(subset=["fold"]).astype({"fold": int})
    return split_index.assign(fold=np.where(split_index.ok, -1, UNREADABLE))


def class_maps(trained: Artifact, features: Artifact, split: str, chosen: pd.DataFrame, device) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, C) and the predicted class's heatmap (N, h, w) of the chosen images."""
    summary = json.loads(trained.file("summary.json").read_text())
    array = load_features(features, "train" if split == "valid" else split, "map")
    models = {fold: load_fold_model(trained, fold, device) for fold in range(summary["folds"])}
    # Only the chosen rows are read from the memory map.
    chosen_features = FeatureSet(np.asarray(array[chosen.row.to_numpy()]), np.arange(len(chosen)), size_onehot(chosen, summary["size_vocabulary"]))
    folds = chosen.fold.to_numpy()
    probs = heat = None
    # One batch per fold model: its own validation images, and every test image (folds averaged).
    for fold, model in models.items():
        pick = np.flatnonzero((folds == fold) | (folds < 0))
        if not len(pick):
            continue
        out = predict(model, chosen_features.subset(pick), device)
        weight = np.where(folds[pick] < 0, 1.0 / len(models), 1.0)
        if probs is None:
            probs = np.zeros((len(chosen),) + out["probs"].shape[1:])
            heat = np.zeros((len(chosen),) + out["heatmaps"].shape[1:])
        probs[pick] += out["probs"] * weight[:, None]
        heat[pick] += out["heatmaps"] * weight[:, None, None, None]
    return probs, heat[np.arange(len(chosen)), probs.argmax(axis=1)]


def _choose(candidates: pd.DataFrame, images: list[str], count: int, split: str) -> pd.DataFrame:
    unreadable = candidates.image[candidates.fold == UNREADABLE]
    candidates = candidates[candidates.fold != UNREADABLE]
    if not images:
        return candidates.head(count)
    named_unreadable = [name for name in images if name in set(unreadable)]
    if named_unreadable:
        raise FishcompError(f"{named_unreadable[0]} could not be read when its features were computed; it has no heatmap")
    chosen = candidates[candidates.image.isin(images)]
    missing = sorted(set(images) - set(chosen.image))
    if missing:
        raise FishcompError(f"not among the {split} images: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return chosen.set_index("image").loc[images].reset_index()


def check_heatmap_head(loaded: LoadedConfig) -> None:
    config = loaded.config
    if not config.trains or config.head.kind not in list_heatmap_heads():
        raise FishcompError(f"{loaded.path}: heatmaps need a head that makes class maps ({', '.join(list_heatmap_heads())})")


def draw_heatmaps(
    root: Path, classes: list[str], split: str, chosen: pd.DataFrame, probs: np.ndarray, maps: np.ndarray, out: Path
) -> tuple[list[Path], Path]:
    """One overlay PNG per image plus `grid.png` of them all."""
    panels, written = [], []
    boxes = normalised_boxes(chosen)
    for record, image_probs, heatmap, box in zip(chosen.itertuples(index=False), probs, maps, boxes):
        try:
            photo, _ = load_rgb(root / record.path)
        except UnreadableImage as exc:
            # Readable when its features were computed, not now (replaced or damaged since).
            warn(f"heatmap of {record.image} skipped: {exc}")
            continue
        predicted = int(image_probs.argmax())
        truth = f"true {classes[int(record.label)]}, " if split == "valid" else ""
        title = f"{record.image}: {truth}predicted {classes[predicted]} {image_probs[predicted]:.2f}"
        written.append(heatmap_overlay(photo, heatmap, title, out / f"{Path(record.image).stem}.png", box))
        panels.append((photo, heatmap, title, box))
    return written, heatmap_grid(panels, out / "grid.png")


def heatmaps(ctx: Context, loaded: LoadedConfig, split: str, images: list[str], count: int, out: Path) -> dict:
    """Write one overlay PNG per chosen image plus `grid.png`; returns their paths and the pointing score."""
    if split not in SPLITS:
        raise FishcompError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    check_heatmap_head(loaded)
    from fishcomp.pipeline import resolver

    plan = resolver(ctx)
    node = plan.node("train", loaded)
    trained, features = plan.build(node), plan.build(node.inputs["features"])
    chosen = _choose(candidates(trained, features, split), images, count, split)
    if chosen.empty:
        raise FishcompError(f"no {split} images to draw")
    classes = json.loads(features.file("meta.json").read_text())["classes"]
    probs, maps = class_maps(trained, features, split, chosen, resolve_device(loaded.config.train.device))
    written, grid = draw_heatmaps(ctx.data_dir, classes, split, chosen, probs, maps, out / split)
    if not written:
        raise FishcompError(f"none of the {len(chosen)} chosen {split} image(s) could be read; see the warnings above")
    boxes = normalised_boxes(chosen)
    boxed = ~np.isnan(boxes).any(axis=1)
    result = {"images": written, "grid": grid, "pointing": None, "boxed": int(boxed.sum())}
    if boxed.any():
        result["pointing"] = float(pointing_hits(maps[boxed], boxes[boxed]).mean())
    pointing = (
        f"; heatmap peak inside the box for {result['pointing']:.0%} of {result['boxed']} boxed image(s)"
        if result["pointing"] is not None else ""
    )
    info(f"heatmap    wrote   {len(written)} overlay(s) and {grid}{pointing}")
    return result
