"""A photo over PIL's pixel limit (a decompression bomb to PIL) is an unreadable image to every
command that opens images: warned, counted and skipped for train, the --on-bad-test rule for test,
never a traceback."""

import json
import shutil

import pytest
from helpers import CONFIGS, SMALL, TINY, run_cli
from PIL import Image


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


QUICK = _sets(["split.kind=holdout", "train.phases=[{epochs: 2, lr: 1.0e-3}]", "train.batch_size=32", "precompute.size=[128,224]"])


@pytest.fixture(scope="module")
def bomb_data(tiny_data, tmp_path_factory):
    """The tiny set plus one over-limit PNG named .jpg in train/ALB and one in test_stg1."""
    root = tmp_path_factory.mktemp("bomb") / "data"
    shutil.copytree(tiny_data, root)
    # 14500 x 14000 = 203 M pixels, over twice PIL's limit: Image.open refuses it. One bit per pixel
    # keeps the file (and the memory to write it) small.
    assert 14500 * 14000 > 2 * Image.MAX_IMAGE_PIXELS
    bomb = Image.new("1", (14500, 14000))
    for target in (root / "train" / "ALB" / "bomb.jpg", root / "test_stg1" / "bomb.jpg"):
        bomb.save(target, format="PNG")
    with open(root / "sample_submission_stg1.csv", "a") as handle:
        handle.write("bomb.jpg," + ",".join(["0.125"] * 8) + "\n")
    return root


def _clean(code, stderr):
    assert "Traceback" not in stderr and "DecompressionBomb" not in stderr.split("bomb.jpg")[0]
    return code


def test_check_lists_an_over_limit_image_as_unreadable(bomb_data, capsys):
    code, stdout, stderr = run_cli(["check", "--data", bomb_data], capsys)
    assert _clean(code, stderr) == 0, stderr
    assert "unreadable files: 2 (" in stdout and "train/ALB/bomb.jpg" in stdout and "test_stg1/bomb.jpg" in stdout


def test_precompute_and_training_skip_it_in_train_and_apply_the_bad_test_rule(bomb_data, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "sub.csv"
    command = ["run", "-c", CONFIGS / "dense.yaml", "--data", bomb_data, "--work", work, "--out", out, *QUICK]
    code, _, stderr = run_cli(command, capsys)
    assert _clean(code, stderr) == 2 and "1 unreadable test image(s): test_stg1/bomb.jpg" in stderr
    code, _, stderr = run_cli([*command, "--on-bad-test", "prior"], capsys)
    assert _clean(code, stderr) == 0, stderr
    assert "1 unreadable train image(s) left out of training" in stderr
    assert "1 unreadable test image(s) will be predicted as the class prior: test_stg1/bomb.jpg" in stderr
    code, stdout, stderr = run_cli(["report", CONFIGS / "dense.yaml", "--data", bomb_data, "--work", work, "--out", tmp_path / "report", *QUICK], capsys)
    assert _clean(code, stderr) == 0, stderr
    assert (tmp_path / "report" / "index.html").is_file()


def test_crops_skip_it(bomb_data, tmp_path, capsys):
    work = tmp_path / "work"
    # Only where the crops are cut matters here: one crop a photo, the box source's as it is.
    one_crop = ["crops.candidates=null", "crops.nof=null", "crops.tta=null", "crops.jitter=null"]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", bomb_data, "--work", work, "--on-bad-test", "prior",
                               *_sets([*SMALL, *one_crop])], capsys)
    assert _clean(code, stderr) == 0, stderr
    meta = json.loads(next((work / "crops").glob("crops-*/meta.json")).read_text())
    assert {"train/ALB/bomb.jpg", "test_stg1/bomb.jpg"} <= set(meta["unreadable"])


def test_heatmap_draws_the_readable_images_and_names_the_unreadable_one(bomb_data, tmp_path, capsys):
    args = ["-c", CONFIGS / "fcn.yaml", "--data", bomb_data, "--work", tmp_path / "work", "--split", "test_stg1", *_sets([*TINY, "precompute.size=[128,224]"])]
    code, stdout, stderr = run_cli(["heatmap", *args, "-n", "3", "--out", tmp_path / "maps"], capsys)
    assert _clean(code, stderr) == 0, stderr
    assert len(list((tmp_path / "maps" / "test_stg1").glob("*.png"))) == 4  # three overlays and the grid
    code, _, stderr = run_cli(["heatmap", *args, "--image", "bomb.jpg", "--out", tmp_path / "maps2"], capsys)
    assert _clean(code, stderr) == 2 and "bomb.jpg could not be read when its features were computed" in stderr
