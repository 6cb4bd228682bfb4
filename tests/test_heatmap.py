"""`fishcomp heatmap`: PNG overlays of a class-map head's heatmaps, through the real CLI."""

import re

import pandas as pd
import pytest
from helpers import CONFIGS, TINY, run_cli
from PIL import Image


@pytest.fixture(scope="module")
def fcn_args(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("heatmap-work")
    args = ["-c", CONFIGS / "fcn.yaml", "--data", tiny_data, "--work", work, "--set", "precompute.size=[224,224]"]
    for override in TINY:
        args += ["--set", override]
    return args, work


def test_heatmaps_of_validation_images_are_pngs_of_the_photos(fcn_args, tiny_data, tmp_path, capsys):
    args, work = fcn_args
    out = tmp_path / "maps"
    code, stdout, stderr = run_cli(["heatmap", *args, "-n", "5", "--out", out], capsys)
    assert code == 0, stderr
    pngs = sorted((out / "valid").glob("img_*.png"))
    assert len(pngs) == 5 and (out / "valid" / "grid.png").is_file()
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 300
            # The overlay keeps the photo's landscape shape.
            assert 1.3 < image.width / image.height < 2.3
    match = re.search(r"peak inside the box for (\d+)% of (\d+) boxed", stdout)
    assert match and int(match.group(2)) >= 1
    assert not list(out.rglob(".*.tmp"))


def test_named_test_images_average_the_fold_models(fcn_args, tiny_data, tmp_path, capsys):
    args, _ = fcn_args
    names = pd.read_csv(tiny_data / "sample_submission_stg1.csv").image.head(2).tolist()
    out = tmp_path / "maps"
    command = ["heatmap", *args, "--split", "test_stg1", "--out", out]
    for name in names:
        command += ["--image", name]
    code, stdout, stderr = run_cli(command, capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "test_stg1").glob("*.png")) == sorted([n.replace(".jpg", ".png") for n in names] + ["grid.png"])
    assert "built" not in stdout  # the trained head was reused from the cache


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--image", "no_such.jpg"], "not among the valid images: no_such.jpg"),
        (["--split", "train"], "--split train: choose one of valid, test_stg1, test_stg2"),
    ],
)
def test_bad_heatmap_requests_are_one_line_errors(fcn_args, tmp_path, capsys, extra, message):
    args, _ = fcn_args
    code, _, stderr = run_cli(["heatmap", *args, "--out", tmp_path, *extra], capsys)
    assert code == 2 and message in stderr and stderr.count("\n") == 1


def test_heads_without_class_maps_are_refused_before_training(tiny_data, tmp_path, capsys):
    code, _, stderr = run_cli(["heatmap", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", tmp_path], capsys)
    assert code == 2 and "need a head that makes class maps (fcn, inception)" in stderr
    assert not (tmp_path / "train").exists()
