"""Augmentation (boxes moved with the image), augmented precompute, and test-time augmentation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS, SMALL, run_cli

from fishcomp.config import load_config
from fishcomp.context import Context
from fishcomp.data.augment import (
    DEFAULT_AUGMENT,
    DEFAULT_TTA,
    apply_transform,
    build_transform,
)
from fishcomp.errors import FishcompError
from fishcomp.pipeline import resolver
from fishcomp.training.feature_sets import FeatureSet, combine_views, predict

GEOMETRY = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.3},
    {"name": "Affine", "scale": [0.8, 1.2], "translate_percent": [-0.15, 0.15], "rotate": [-20, 20], "p": 1.0},
]


def _drawn_rectangle():
    image = np.full((180, 320, 3), 30, dtype=np.uint8)
    image[60:100, 120:200] = 255
    return image, np.array([120, 60, 80, 40], dtype=np.float32)


def _bright_bbox(image):
    ys, xs = np.nonzero(image[..., 0] > 128)
    return np.array([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], dtype=np.float32)


def _iou(a, b):
    from fishcomp.boxes import box_iou

    return float(box_iou(a[None], b[None])[0])


@pytest.mark.parametrize("seed", range(12))
def test_augmented_boxes_stay_on_the_drawn_rectangle(seed):
    image, box = _drawn_rectangle()
    moved_image, moved_box = apply_transform(build_transform(GEOMETRY), image, box, seed)
    if np.isnan(moved_box).any():
        assert (moved_image[..., 0] > 128).sum() < 0.1 * 80 * 40  # dropped only when the rectangle left the image
        return
    assert _iou(moved_box, _bright_bbox(moved_image)) > 0.8


def test_the_same_seed_gives_the_same_augmentation_and_another_seed_differs():
    image, box = _drawn_rectangle()
    transform = build_transform(DEFAULT_AUGMENT)
    first, first_box = apply_transform(transform, image, box, 7)
    again, again_box = apply_transform(transform, image, box, 7)
    assert np.array_equal(first, again) and np.allclose(first_box, again_box, equal_nan=True)
    others = [apply_transform(transform, image, box, s)[0] for s in range(8, 14)]
    assert any(not np.array_equal(first, other) for other in others)


def test_night_vision_makes_a_dark_green_grainy_picture():
    image = np.random.default_rng(0).integers(90, 230, (64, 64, 3), dtype=np.uint8)
    night, _ = apply_transform(build_transform([{"name": "NightVision", "p": 1.0}]), image, None, 0)
    assert night.mean() < image.mean() - 20
    red, green, blue = (night[..., c].astype(float).mean() for c in range(3))
    assert green > red + 15 and green > blue + 15


def test_transform_typos_are_config_errors_naming_the_key():
    with pytest.raises(FishcompError, match=r"precompute.augment.transforms`: transform 0: unknown albumentations transform `HorizontalFlp`; did you mean HorizontalFlip"):
        load_config(CONFIGS / "dense.yaml", ["precompute.augment={transforms: [{name: HorizontalFlp}]}"])
    with pytest.raises(FishcompError, match="bad parameters for Affine: Argument.*'rotat'"):
        load_config(CONFIGS / "dense.yaml", ["precompute.augment={transforms: [{name: Affine, rotat: 3}]}"])
    assert build_transform(DEFAULT_TTA) is not None


def test_the_precompute_key_follows_the_augmentation_and_one_tta_view_is_no_tta(tiny_data):
    ctx = Context(data_dir=tiny_data, work_dir=tiny_data / "unused")

    def key(*overrides):
        return resolver(ctx).node("precompute", load_config(CONFIGS / "dense.yaml", list(overrides))).key

    plain = key()
    keys = {
        plain,
        key("precompute.augment={copies: 1}"),
        key("precompute.augment={copies: 2}"),
        key("precompute.augment={copies: 2, transforms: [{name: HorizontalFlip, p: 0.5}]}"),
        key("precompute.tta={views: 3}"),
    }
    assert len(keys) == 5
    assert key("precompute.tta={views: 1}") == plain
    assert key("precompute.tta={views: 3, combine: geometric}") == key("precompute.tta={views: 3}")  # read by training only


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(6, 8)

    def forward(self, x, size=None):
        return {"logits": self.layer(x)}


@pytest.mark.parametrize("method", ["mean", "geometric"])
def test_tta_with_identical_views_changes_nothing_and_different_views_are_averaged(method):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(10, 6)).astype(np.float32)
    other = rng.normal(size=(10, 6)).astype(np.float32)
    model = _Linear()
    plain = predict(model, FeatureSet(array, np.arange(10)), "cpu", tta=method)["probs"]
    same = predict(model, FeatureSet(array, np.arange(10), views=[array.copy()]), "cpu", tta=method)
    np.testing.assert_allclose(same["probs"], plain, atol=1e-6)
    mixed = predict(model, FeatureSet(array, np.arange(10), views=[other]), "cpu", tta=method)
    alone = predict(model, FeatureSet(other, np.arange(10)), "cpu")["probs"]
    np.testing.assert_allclose(mixed["probs"], combine_views([plain, alone], method), atol=1e-6)
    np.testing.assert_allclose(mixed["probs_original"], plain, atol=1e-6)


def test_training_draws_augmented_copies_and_reports_tta(tiny_data, tmp_path, capsys):
    args = ["train", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", tmp_path]
    for override in SMALL + ["precompute.augment={copies: 2}", "precompute.tta={views: 3}"]:
        args += ["--set", override]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "TTA x3" in stdout
    folder = next((tmp_path / "precompute").glob("efficientnet*"))
    assert np.load(folder / "train_aug_pooled.npy", mmap_mode="r").shape[:2] == (2, 120)
    assert np.load(folder / "test_stg1_tta_pooled.npy", mmap_mode="r").shape[:2] == (2, 24)
    assert np.load(folder / "train_aug_boxes.npy").shape == (2, 120, 4)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["augment_copies"] == 2 and meta["tta_views"] == 3
    summary = json.loads(next((tmp_path / "train").glob("dense-*/summary.json")).read_text())
    assert summary["augment_copies"] == 2 and summary["tta_views"] == 3
    assert summary["valid_logloss"] < summary["prior_logloss"]
    assert summary["valid_logloss"] != summary["valid_logloss_without_tta"]

    # `predict` draws each photo's random views as precompute drew them (its place among the data's
    # images numbers its seeds, not its place in the list given), so it predicts what the run
    # predicted for it, whichever photos come with it. Tolerance: the same float16 features, but
    # the backbone's calls group other images, which can move a feature by one float16 step.
    import pandas as pd

    trained = next((tmp_path / "train").glob("dense-*"))
    expected = pd.read_csv(trained / "test_stg1.csv").set_index("image")
    names = sorted(expected.index)[:4]
    for chosen in (names, names[::-1], names[2:3]):
        out = tmp_path / "predicted.csv"
        args = ["predict", "-c", CONFIGS / "dense.yaml", *[tiny_data / "test_stg1" / name for name in chosen],
                "--data", tiny_data, "--work", tmp_path, "--out", out]
        for override in SMALL + ["precompute.augment={copies: 2}", "precompute.tta={views: 3}"]:
            args += ["--set", override]
        code, stdout, stderr = run_cli(args, capsys)
        assert code == 0 and "built" not in stdout, stderr
        predicted = pd.read_csv(out)
        predicted["image"] = [Path(path).name for path in predicted.image]
        np.testing.assert_allclose(predicted.set_index("image").loc[chosen].to_numpy(), expected.loc[chosen].to_numpy(), atol=5e-3)


def test_mirror_copies_train_on_the_mirrored_view_the_pass_already_made(tiny_data, tmp_path, capsys):
    """`train.mirror_copies`: the probe fits on each photo and its mirror (twice the rows), a head
    trained by steps draws either each epoch (the crops' box source does so on the map); all from
    the one cached pass, no copies computed."""
    for config in ("linear_360x640", "dense_360x640_probe"):
        summaries = {}
        for mirror in ("null", "true"):
            args = ["train", "-c", CONFIGS / f"{config}.yaml", "--data", tiny_data, "--work", tmp_path]
            for override in [*SMALL, f"train.mirror_copies={mirror}"]:
                args += ["--set", override]
            code, stdout, stderr = run_cli(args, capsys)
            assert code == 0, stderr
            folder = stdout.split("train      built   ")[1].split()[0]
            summaries[mirror] = json.loads((tmp_path / "train" / folder.rsplit("/", 1)[-1] / "summary.json").read_text())
        assert (summaries["null"]["augment_copies"], summaries["true"]["augment_copies"]) == (0, 1), config
        assert summaries["true"]["valid_logloss"] != summaries["null"]["valid_logloss"], config
        assert summaries["true"]["valid_logloss"] < summaries["true"]["prior_logloss"], config
    assert len(list((tmp_path / "precompute").glob("efficientnet*"))) == 1  # one pass (with its mirrored view)


def test_turning_off_the_view_that_training_copies_read_is_a_one_line_error(tiny_data, tmp_path, capsys):
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "fcn.yaml", "--data", tiny_data, "--work", tmp_path, "--set", "precompute.tta=null"], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "train.mirror_copies" in stderr and "``" not in stderr  # a rule across sections names its keys itself
    assert not (tmp_path / "train").exists() and not (tmp_path / "precompute").exists()
