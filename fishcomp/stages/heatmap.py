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

from fishcomp.config import LoadedConfig
from fishcomp.console import info
from fishcomp.data.images import UnreadableImage, load_rgb
from fishcomp.errors import FishcompError
from fishcomp.models.heads import list_heatmap_heads
from fishcomp.models.losses import pointing_hits
from fishcomp.stages.context import Context, resolve_device
from fishcomp.stages.precompute import ensure_precompute, load_features, load_index
from fishcomp.stages.feature_sets import FeatureSet, predict
from fishcomp.stages.train import ensure_train, load_fold_model, normalised_boxes, size_onehot
from fishcomp.viz import heatmap_grid, heatmap_overlay

SPLITS = ("valid", "test_stg1", "test_stg2")


def _choose(candidates: pd.DataFrame, images: list[str], count: int, split: str) -> pd.DataFrame:
    if not images:
        return candidates.head(count)
    chosen = candidates[candidates.image.isin(images)]
    missing = sorted(set(images) - set(chosen.image))
    if missing:
        raise FishcompError(f"not among the {split} images: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return chosen.set_index("image").loc[images].reset_index()


def heatmaps(ctx: Context, loaded: LoadedConfig, split: str, images: list[str], count: int, out: Path) -> dict:
    """Write one overlay PNG per chosen image plus `grid.png`; returns their paths and the pointing score."""
    if split not in SPLITS:
        raise FishcompError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    config = loaded.config
    if not config.trains or config.head.kind not in list_heatmap_heads():
        raise FishcompError(f"{loaded.path}: heatmaps need a head that makes class maps ({', '.join(list_heatmap_heads())})")
    trained = ensure_train(ctx, loaded)
    features = ensure_precompute(ctx, loaded)
    summary = json.loads(trained.file("summary.json").read_text())
    index = load_index(features)
    source = "train" if split == "valid" else split
    split_index = index[index.split == source].reset_index(drop=True)
    if split_index.empty:
        raise FishcompError(f"the data has no {source} images")
    split_index["row"] = np.arange(len(split_index))
    classes = json.loads(features.file("meta.json").read_text())["classes"]
    if split == "valid":
        oof = pd.read_csv(trained.file("oof.csv"))[["image", "fold"]]
        candidates = split_index.merge(oof[oof.fold >= 0], on="image")
    else:
        candidates = split_index[split_index.ok].assign(fold=-1)
    chosen = _choose(candidates, images, count, split)
    if chosen.empty:
        raise FishcompError(f"no {split} images to draw")

    device = resolve_device(config.train.device)
    array = load_features(features, source, "map")
    vocabulary = summary["size_vocabulary"]
    models = {fold: load_fold_model(trained, fold, device) for fold in range(summary["folds"])}
    panels, written, maps_for_score, boxes_for_score = [], [], [], []
    # Only the chosen rows are read from the memory map.
    chosen_features = FeatureSet(np.asarray(array[chosen.row.to_numpy()]), np.arange(len(chosen)), size_onehot(chosen, vocabulary))
    for number, record in enumerate(chosen.itertuples(index=False)):
        one = chosen.iloc[[number]]
        rows = chosen_features.subset(np.array([number]))
        folds = [record.fold] if record.fold >= 0 else list(models)
        outputs = [predict(models[fold], rows, device) for fold in folds]
        probs = np.mean([o["probs"][0] for o in outputs], axis=0)
        predicted = int(probs.argmax())
        heatmap = np.mean([o["heatmaps"][0, predicted] for o in outputs], axis=0)
        box = normalised_boxes(one)[0]
        try:
            photo, _ = load_rgb(ctx.data_dir / record.path)
        except UnreadableImage as exc:
            raise FishcompError(f"cannot draw {record.image}: {exc}") from exc
        truth = f"true {classes[int(record.label)]}, " if split == "valid" else ""
        title = f"{record.image}: {truth}predicted {classes[predicted]} {probs[predicted]:.2f}"
        written.append(heatmap_overlay(photo, heatmap, title, out / split / f"{Path(record.image).stem}.png", box))
        panels.append((photo, heatmap, title, box))
        if not np.isnan(box).any():
            maps_for_score.append(heatmap)
            boxes_for_score.append(box)
    grid = heatmap_grid(panels, out / split / "grid.png")
    result = {"images": written, "grid": grid, "pointing": None, "boxed": len(boxes_for_score)}
    if boxes_for_score:
        result["pointing"] = float(pointing_hits(np.stack(maps_for_score), np.stack(boxes_for_score)).mean())
    pointing = (
        f"; heatmap peak inside the box for {result['pointing']:.0%} of {result['boxed']} boxed image(s)"
        if result["pointing"] is not None else ""
    )
    info(f"heatmap    wrote   {len(written)} overlay(s) and {grid}{pointing}")
    return result
