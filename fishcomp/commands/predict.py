"""`fishcomp predict`: class probabilities for any photos with a trained config's fold models.

The photos go through the pass the run's features came from (same backbone, size, weights,
normalisation and precision), then every fold's head; the folds' probabilities are averaged, as
for the test images of the run itself. Runs on whole-image features (every head on pooled
vectors or maps, the linear probe); detect-then-classify and fine-tuned runs, and blends of
members (whose test predictions `fishcomp run` writes), are not supported.
A config with test-time views (`precompute.tta`) gets them here too, combined as in its run: a
deterministic view (the 360x640 configs' mirror image) gives exactly the run's probabilities for
its own test photos; random views are drawn afresh, the same kind of draw as the run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.config import LoadedConfig
from fishcomp.console import progress, warn
from fishcomp.context import Context, resolve_device
from fishcomp.distributed import device_for
from fishcomp.data.augment import build_transform
from fishcomp.errors import FishcompError
from fishcomp.features import (
    DecodedViews,
    Embedder,
    View,
    image_batches,
    resolved_precompute,
    transform_seed,
    tta_combine,
)
from fishcomp.models.heads import head_uses_map
from fishcomp.training.data import size_onehot
from fishcomp.training.feature_sets import FeatureSet, predict
from fishcomp.training.folds import load_fold_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def find_images(images: list[Path], folder: Path | None) -> list[Path]:
    if folder is not None:
        if not folder.is_dir():
            raise FishcompError(f"--folder {folder}: no such folder")
        images = [*images, *sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)]
    if not images:
        raise FishcompError("nothing to predict: name image files, or --folder DIR")
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FishcompError(f"image not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    return images


def _whole_image(config) -> bool:
    return config.crops is None and not (config.train is not None and config.train.finetune is not None)


def predict_images(ctx: Context, loaded: LoadedConfig, paths: list[Path]) -> pd.DataFrame:
    from fishcomp.pipeline import resolver

    config = loaded.config
    plan = resolver(ctx)
    if config.ensemble is not None and not config.trains:
        # A blend's weights, stacker and calibration were fitted on all its members' out-of-fold
        # predictions, the crops' among them, which predict cannot make; rather than a blend of
        # some members under weights fitted for all, say which members it can predict with.
        served = [member.path.name for _, member in plan.ensemble_members(loaded)[0] if _whole_image(member.config)]
        raise FishcompError(
            f"{loaded.path}: predict works with one head's config, not a blend; its test predictions are in `fishcomp run`'s "
            f"submission. Predict with one of its members" + (f" ({', '.join(served)})" if served else "")
        )
    if not _whole_image(config):
        raise FishcompError(f"{loaded.path}: predict works with heads on whole-image features, not crops or fine-tuning")
    node = plan.node("train", loaded)
    trained = plan.build(node)
    summary = json.loads(trained.file("summary.json").read_text())
    precompute = resolved_precompute(config.precompute, **node.inputs["features"].request)
    kind = "map" if head_uses_map(config.head) else "pooled"
    device = resolve_device(device_for(precompute.device))
    embedder = Embedder(precompute, device)
    # The run's test-time views too (its `precompute.tta`), made as precompute makes them and
    # combined as the run's test predictions are: otherwise a TTA config would predict a photo
    # otherwise than it predicted the same photo among its test images.
    combine = tta_combine(loaded)
    tta = precompute.tta if combine else None
    transform = build_transform(tta.transforms) if tta else None
    located = [str(p.resolve()) for p in paths]
    numbers = view_numbers(ctx, located)
    looks = [View(), *(View(transform, transform_seed(tta.seed, number), numbering=numbers) for number in range(tta.views - 1 if tta else 0))]
    views = [[] for _ in looks]
    sizes, readable = np.zeros((len(paths), 2), dtype=np.int64), np.zeros(len(paths), dtype=bool)
    import torch

    with progress("predict", len(paths) * len(looks)) as advance, torch.inference_mode():
        images = DecodedViews(Path("/"), located, tuple(precompute.size), looks)
        for batch, local, width, height, ok, _, _ in image_batches(images, precompute.batch_size, precompute.workers, device):
            rows = local.numpy()
            sizes[rows], readable[rows] = np.stack([width.numpy(), height.numpy()], axis=1), ok.numpy()
            for number, features in enumerate(views):
                pooled, feature_map = embedder.embed(batch[:, number].contiguous(), spatial=kind == "map")
                # Stored features are float16; so are these, so the heads see what they saw in training.
                features.append((feature_map if kind == "map" else pooled).astype(np.float16))
                advance(len(rows))
    views = [np.concatenate(features) for features in views]
    for path in np.asarray(paths, dtype=object)[~readable]:
        warn(f"unreadable image skipped: {path}")
    if not readable.any():
        raise FishcompError("none of the images could be read")
    original, *others = [view[readable] for view in views]
    index = pd.DataFrame({"width": sizes[readable, 0], "height": sizes[readable, 1]})
    feature_set = FeatureSet(original, np.arange(len(original)), size_onehot(index, summary["size_vocabulary"]), views=others)
    probs = np.zeros((len(original), len(trained_classes(trained))))
    for fold in range(summary["folds"]):
        probs += predict(load_fold_model(trained, fold, device), feature_set, device, tta=combine)["probs"] / summary["folds"]
    frame = pd.DataFrame(probs, columns=trained_classes(trained))
    frame.insert(0, "image", [str(p) for p in np.asarray(paths, dtype=object)[readable]])
    return frame


def view_numbers(ctx: Context, located: list[str]) -> np.ndarray:
    """Each photo's number in its test-time views' per-image seeds: its row among the data's images
    where it is one of them, as precompute numbers it, so it gets exactly the views its run's test
    predictions averaged; otherwise a number from its file name. Either way a photo's views do not
    depend on which other photos it is predicted with (its place in the list would)."""
    import zlib

    root = ctx.dataset().root
    rows = {str((root / path).resolve()): row for row, path in enumerate(ctx.dataset().images.path)}
    return np.array([rows.get(path, zlib.crc32(Path(path).name.encode()) % 1_000_000) for path in located], dtype=np.int64)


def trained_classes(trained) -> list[str]:
    return list(pd.read_csv(trained.file("oof.csv"), nrows=0).columns[3:])
