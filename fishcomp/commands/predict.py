"""`fishcomp predict`: class probabilities for any photos with a trained config's fold models.

A head on whole-image features (pooled vectors or maps, the linear probe): the photos go
through the pass the run's features came from (same backbone, size, weights, normalisation and
precision), then every fold's head; the folds' probabilities are averaged, as for the test images
of the run itself, and calibrated as the run was where the config calibrates. A config with
test-time views (`precompute.tta`) gets them here too, combined as in its run: a deterministic
view (the 360x640 configs' mirror image) gives exactly the run's probabilities for its own test
photos; random views are drawn afresh, the same kind of draw as the run's.

A blend (`pipeline.yaml`) or a detect-then-classify head (`crops.yaml`) needs its whole graph: the
box source's boxes, the crops, every member, the blend's weights and calibration. It is predicted
the way stage 2's photos are (`Stage.fit_params`): the graph runs on a data folder whose train
part is the data's own and whose test images are the photos, so every backbone pass, crops and
head takes its train part and fold models from the finished run and only the photos are embedded,
cut and predicted; the blend refits on the same out-of-fold rows. The run's own calibration is
applied, with the temperature its stage-1 photos' fold mean got: refitted on a handful of photos,
that spread would make each photo's probabilities depend on the photos it came with. What the
prediction builds is removed afterwards: it holds a copy of the train features, which nothing
else reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import MANIFEST
from fishcomp.config import LoadedConfig
from fishcomp.console import info, progress, warn
from fishcomp.context import Context, resolve_device
from fishcomp.distributed import device_for
from fishcomp.data.augment import build_transform
from fishcomp.data.images import UnreadableImage, load_rgb
from fishcomp.data.layout import sample_submission_path
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
from fishcomp.predictions import predictions_stage, read_predictions
from fishcomp.stages.calibrate import Calibration
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
    if loaded.config.ensemble is not None or not _whole_image(loaded.config):
        return predict_through_run(ctx, loaded, paths)
    from fishcomp.pipeline import resolver

    config = loaded.config
    calibrate = _the_runs_calibration(ctx, loaded)  # before any photo is embedded: it may say the run is not finished
    plan = resolver(ctx)
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
    frame = pd.DataFrame(calibrate(probs), columns=trained_classes(trained))
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


# Where a prediction's data folder is made, in the work folder (not a stage's folder, so `cache`
# never lists it): the photos' links and links to the data's train images and boxes.
PREDICT_FOLDER = "predict"
# The statuses of a node whose train part a prediction can take as it is.
_TAKEN = ("cached", "to reuse", "to resume")


def predict_through_run(ctx: Context, loaded: LoadedConfig, paths: list[Path]) -> pd.DataFrame:
    """A blend's or a crops head's probabilities for the photos (calibrated where the config
    calibrates; no clip, which is the submission's), from its finished run's fold models: see the
    module's docstring."""
    from fishcomp.pipeline import resolver

    readable = [path for path in paths if _readable(path)]
    if not readable:
        raise FishcompError("none of the images could be read")
    calibrate = _the_runs_calibration(ctx, loaded)
    root, names = _photos_as_test_images(ctx, readable)
    info(f"predict    [{loaded.name}] {len(readable)} photo(s) as the test images of its graph on the train images' finished run "
         f"({root}); what this builds is removed afterwards")
    viewed = Context(data_dir=root, work_dir=ctx.work_dir, overrides=ctx.overrides, on_bad_test="fail")
    plan = resolver(viewed)
    goal = plan.plan(predictions_stage(loaded.config), loaded)
    nodes = plan.walk(goal)
    untrained = [node for node in nodes if node.stage.reuses_fit and plan.status(node) not in _TAKEN]
    if untrained:
        _remove_folder(ctx, root)
        listed = ", ".join(f"{node.stage.name} [{node.label}]" for node in untrained[:4]) + (f" (+{len(untrained) - 4} more)" if len(untrained) > 4 else "")
        raise _not_run(loaded, f"{len(untrained)} of its stages {'has' if len(untrained) == 1 else 'have'} none ({listed})")
    tests = read_predictions(plan.build(goal)).tests["test_stg1"].set_index("image").loc[names]
    _remove_built_for(viewed, nodes, root)
    frame = pd.DataFrame(calibrate(tests.to_numpy(dtype=np.float64)), columns=tests.columns)
    frame.insert(0, "image", [str(path) for path in readable])
    return frame


def _not_run(loaded: LoadedConfig, what: str) -> FishcompError:
    return FishcompError(
        f"{loaded.path}: predict takes every fold model from a finished run of it, and {what}; run `fishcomp run -c "
        f"{loaded.path}` with this --data and --work first (a head trained on pseudo-labels or a fine-tuned one trains "
        "again for new photos, so predict cannot serve it)"
    )


def _the_runs_calibration(ctx: Context, loaded: LoadedConfig):
    """The finished run's calibration as a function of probabilities (the identity for a config
    without one), at the temperature the run's stage-1 test photos' fold mean got."""
    if loaded.config.calibrate is None:
        return lambda probs: probs
    from fishcomp.pipeline import resolver

    plan = resolver(ctx)
    found = plan.find(plan.plan("calibrate", loaded))
    if found is None:
        raise _not_run(loaded, "its calibration is not built")
    summary = json.loads(found.file("summary.json").read_text())
    bias = summary.get("bias")
    calibration = Calibration(summary["temperature"], None if bias is None else np.array([bias[name] for name in trained_classes(found)]))
    temperature = summary.get("test_temperatures", {}).get("test_stg1", summary["temperature"])
    return lambda probs: calibration.apply(probs, temperature)


def _readable(path: Path) -> bool:
    try:
        load_rgb(path, (64, 64))  # a JPEG decoded at 1/8 scale: enough to know it decodes
        return True
    except UnreadableImage:
        warn(f"unreadable image skipped: {path}")
        return False


def _photos_as_test_images(ctx: Context, paths: list[Path]) -> tuple[Path, list[str]]:
    """A data folder in the competition's layout whose train images and boxes are the data's own
    (links: the same files, so the same fingerprint and fit keys) and whose stage-1 test images
    are `paths` (links named by their file names, made unique); returns it and each photo's name
    there. Named by the photos, so a stopped prediction of the same photos goes on where it stopped."""
    dataset = ctx.dataset()
    located = [path.resolve() for path in paths]
    root = ctx.work_dir / PREDICT_FOLDER / hashlib.sha256("\n".join(map(str, located)).encode()).hexdigest()[:16]
    shutil.rmtree(root, ignore_errors=True)
    (root / "test_stg1").mkdir(parents=True)
    for part in ("train", "annos"):
        if (dataset.root / part).exists():
            (root / part).symlink_to((dataset.root / part).resolve(), target_is_directory=True)
    names, taken = [], set()
    for path in located:
        name, copy = path.name, 1
        while name in taken:  # photos of one name from several folders
            name, copy = f"{path.stem}-{copy}{path.suffix}", copy + 1
        taken.add(name)
        names.append(name)
        (root / "test_stg1" / name).symlink_to(path)
    # The data's classes in its order (a sample submission's header, when it has one): another
    # order would be another dataset, with no fold models to take.
    pd.DataFrame(columns=["image", *dataset.classes]).assign(image=sorted(names)).to_csv(sample_submission_path(root, "test_stg1"), index=False)
    return root, names


def _remove_built_for(ctx: Context, nodes, root: Path) -> None:
    """Every artifact built on the prediction's data folder (each holds a copy of the train
    features, which only this prediction reads), and the folder."""
    built_here = str(root.resolve())
    for node in nodes:
        found = ctx.cache.find(node.stage.name, node.key)
        if found is not None and json.loads((found / MANIFEST).read_text()).get("data", {}).get("folder") == built_here:
            shutil.rmtree(found)
            (found.parent / f".{node.key}.lock").unlink(missing_ok=True)
    _remove_folder(ctx, root)


def _remove_folder(ctx: Context, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    if not any((ctx.work_dir / PREDICT_FOLDER).iterdir()):
        (ctx.work_dir / PREDICT_FOLDER).rmdir()
