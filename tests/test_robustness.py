"""Nothing lost, nothing silent: bad inputs and faults, case by case, through the real CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import CONFIGS, interruptible, run_cli, wait_for_file
from PIL import Image

from fishcomp.data.images import load_rgb

QUICK = ["--set", "split.kind=holdout", "--set", "train.phases=[{epochs: 2, lr: 1.0e-3}]", "--set", "train.batch_size=32"]


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the tiny dataset, to break."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy)
    return copy


def _train(data, work, capsys, *extra):
    return run_cli(["train", "-c", CONFIGS / "dense.yaml", "--data", data, "--work", work, *QUICK, *extra], capsys)


def _no_traceback(stderr):
    assert "Traceback" not in stderr


def _break_files(folder):
    (folder / "zero.jpg").write_bytes(b"")
    good = next(p for p in sorted(folder.iterdir()) if p.suffix == ".jpg" and p.stat().st_size > 0)
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (folder / "notes.jpg").write_text("not an image at all")


def test_unreadable_train_files_are_skipped_counted_and_reported(data, tmp_path, capsys):
    _break_files(data / "train" / "ALB")
    code, stdout, stderr = _train(data, tmp_path / "work", capsys)
    assert code == 0, stderr
    _no_traceback(stderr)
    assert "3 unreadable train image(s) left out of training" in stderr
    meta = json.loads(next((tmp_path / "work" / "precompute").glob("eff*/meta.json")).read_text())
    assert sorted(meta["unreadable"]) == ["train/ALB/notes.jpg", "train/ALB/truncated.jpg", "train/ALB/zero.jpg"]
    summary = json.loads(next((tmp_path / "work" / "train").glob("dense-*/summary.json")).read_text())
    assert summary["train_images"] == 120


def test_unreadable_test_files_stop_the_run_unless_the_prior_is_asked_for(data, tmp_path, capsys):
    _break_files(data / "test_stg1")
    for name in ("zero.jpg", "truncated.jpg", "notes.jpg"):  # the sample submission lists them too
        with open(data / "sample_submission_stg1.csv", "a") as handle:
            handle.write(f"{name}," + ",".join(["0.125"] * 8) + "\n")
    work, out = tmp_path / "work", tmp_path / "sub.csv"
    command = ["run", "-c", CONFIGS / "dense.yaml", "--data", data, "--work", work, "--out", out, *QUICK]
    code, _, stderr = run_cli(command, capsys)
    assert code == 2 and "3 unreadable test image(s): test_stg1/notes.jpg, test_stg1/truncated.jpg, test_stg1/zero.jpg" in stderr
    assert "--on-bad-test prior" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli([*command, "--on-bad-test", "prior"], capsys)
    assert code == 0, stderr
    assert "3 unreadable test image(s) will be predicted as the class prior" in stderr
    submission = pd.read_csv(out).set_index("image")
    bad = submission.loc[["zero.jpg", "truncated.jpg", "notes.jpg"]].to_numpy()
    assert np.allclose(bad, bad[0]) and not np.allclose(submission.drop(index=["zero.jpg", "truncated.jpg", "notes.jpg"]).iloc[0], bad[0])
    # The same cached features without the option still stop.
    code, _, stderr = run_cli(command, capsys)
    assert code == 2 and "unreadable test image" in stderr


def test_an_unknown_class_folder_is_skipped_and_an_empty_class_still_trains(data, tmp_path, capsys):
    (data / "train" / "SALMON").mkdir()
    Image.new("RGB", (64, 36)).save(data / "train" / "SALMON" / "img_salmon.jpg")
    (data / "train" / "YTF").mkdir()  # a misspelt class
    Image.new("RGB", (64, 36)).save(data / "train" / "YTF" / "img_ytf.jpg")
    shutil.rmtree(data / "train" / "LAG")
    (data / "train" / "LAG").mkdir()
    code, _, stderr = _train(data, tmp_path / "work", capsys)
    assert code == 0, stderr
    assert "train/SALMON: not a class of this competition" in stderr and "train/LAG: empty class folder" in stderr
    assert "train/YTF: not a class of this competition" in stderr and "did you mean YFT?; skipped" in stderr
    assert "no train images of LAG" in stderr
    oof = pd.read_csv(next((tmp_path / "work" / "train").glob("dense-*/oof.csv")))
    assert "img_salmon.jpg" not in set(oof.image)


def test_annotation_problems_are_counted_warnings(data, tmp_path, capsys):
    lag = sorted(p.name for p in (data / "train" / "LAG").iterdir())
    with Image.open(data / "train" / "LAG" / lag[0]) as image:
        width, height = image.size
    extra = [
        # Partly outside: clipped. Wholly outside: dropped. Both counted.
        # (made the largest box of their image, so they are the ones kept).
        {"filename": lag[0], "annotations": [{"class": "rect", "x": width - 10, "y": 0, "width": width, "height": height}]},
        {"filename": lag[1], "annotations": [{"class": "rect", "x": width + 10, "y": 0, "width": width, "height": height}]},
        {"filename": "img_99999.jpg", "annotations": [{"class": "rect", "x": 1, "y": 1, "width": 5, "height": 5}]},
        {"filename": "whatever.jpg", "annotations": [{"class": "salmon", "x": 1, "y": 1, "width": 5, "height": 5}]},
        {"filename": "x.jpg", "annotations": [{"class": "rect", "x": 1, "y": 1, "width": -5, "height": 5}]},
    ]
    (data / "annos" / "zz_labels.json").write_text(json.dumps(extra))
    code, _, stderr = _train(data, tmp_path / "work", capsys)
    assert code == 0, stderr
    assert "1 annotations other than rects and points ignored" in stderr
    assert "1 rects with non-positive size dropped" in stderr
    assert "annotation entries name no train image" in stderr
    meta = json.loads(next((tmp_path / "work" / "precompute").glob("eff*/meta.json")).read_text())
    assert meta["annotations"]["boxes clipped"] >= 1 and meta["annotations"]["boxes outside the image dropped"] >= 1
    index = pd.read_csv(next((tmp_path / "work" / "precompute").glob("eff*/index.csv"))).set_index("image")
    assert index.loc[lag[0], "box_x"] + index.loc[lag[0], "box_w"] <= width
    (data / "annos" / "zz_labels.json").write_text('[{"filename": "a.jpg",\n  "annotations": [}]')
    code, _, stderr = _train(data, tmp_path / "work2", capsys)
    assert code == 2 and "zz_labels.json: malformed JSON at line 2" in stderr


def test_a_huge_photo_decodes(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 6000), (30, 90, 150)).save(path, quality=70)
    image, size = load_rgb(path, target=(640, 360))
    assert size == (8000, 6000) and image.width >= 640 and np.asarray(image).mean() > 50


def test_a_nan_loss_stops_with_one_line_and_keeps_no_model(data, tmp_path, capsys):
    code, _, stderr = _train(data, tmp_path / "work", capsys, "--set", "train.phases=[{epochs: 3, lr: 1.0e+30}]")
    assert code == 2 and "epoch" in stderr and "loss is nan" in stderr.lower() and "lower the learning rate" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "work" / "train").glob("dense-*")) and not list((tmp_path / "work" / "train").glob(".tmp-*"))


def test_a_full_disk_is_a_clear_error_and_leaves_no_artifact(data, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, _, stderr = run_cli(["precompute", "-c", CONFIGS / "dense.yaml", "--data", data, "--work", tmp_path / "work"], capsys)
    assert code == 2 and "writing precompute artifact failed: No space left on device" in stderr
    _no_traceback(stderr)
    assert not [p for p in (tmp_path / "work" / "precompute").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_precompute_leaves_nothing_complete_and_the_rerun_equals_a_clean_run(data, tmp_path, capsys, how):
    work = tmp_path / "work"
    command = [sys.executable, "-m", "fishcomp", "precompute", "-c", str(CONFIGS / "dense.yaml"), "--data", str(data),
               "--work", str(work), "--set", "precompute.batch_size=4", "--set", "precompute.size=[160,160]"]
    marker = tmp_path / "paused"
    # The stage pauses after its first batch and says so (fishcomp/faults.py): the signal arrives
    # mid-way on any machine, however fast, instead of after a guessed sleep.
    env = {**os.environ, "FISHCOMP_NO_PROGRESS": "1", "FISHCOMP_PAUSE_AT": "precompute.batch", "FISHCOMP_PAUSE_MARKER": str(marker)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=interruptible)
    wait_for_file(marker, process)
    assert list(work.glob("precompute/.tmp-*/train_pooled.npy"))  # one batch written, far from all
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert not [p for p in (work / "precompute").iterdir() if not p.name.endswith(".lock")]  # no half artifact, no temp folder

    arrays = []
    for folder in (work, tmp_path / "clean"):
        code, _, stderr = run_cli(["precompute", "-c", CONFIGS / "dense.yaml", "--data", data, "--work", folder, "--set", "precompute.size=[160,160]"], capsys)
        assert code == 0, stderr
        artifact = next((folder / "precompute").glob("eff*"))
        arrays.append([np.load(artifact / f"{split}_pooled.npy") for split in ("train", "test_stg1")])
    for a, b in zip(*arrays):
        np.testing.assert_array_equal(a, b)


def test_a_stopped_training_resumes_at_the_first_missing_fold_and_ends_as_an_uninterrupted_run(tiny_data, tmp_path):
    """Stopped (SIGINT) once two of five folds are done: the rerun trains only folds 2-4 and the
    artifact's predictions equal an uninterrupted run's, bit for bit (each fold seeds itself)."""
    sets = ["--set", "split.folds=5", "--set", "train.phases=[{epochs: 2, lr: 1.0e-3}]", "--set", "train.batch_size=32"]

    def command(work):
        return [sys.executable, "-m", "fishcomp", "train", "-c", str(CONFIGS / "dense.yaml"), "--data", str(tiny_data), "--work", str(work), *sets]

    marker, work = tmp_path / "paused", tmp_path / "work"
    env = {**os.environ, "FISHCOMP_NO_PROGRESS": "1", "FISHCOMP_PAUSE_AT": "train.fold:2", "FISHCOMP_PAUSE_MARKER": str(marker)}
    process = subprocess.Popen(command(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=interruptible)
    wait_for_file(marker, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr
    kept = sorted(p.name for p in (work / "train").glob(".resume-*/fold*.pt"))
    assert kept == ["fold0.pt", "fold1.pt"] and not list((work / "train").glob("dense-*"))

    env = {**os.environ, "FISHCOMP_NO_PROGRESS": "1"}
    resumed = subprocess.run(command(work), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: fold(s) 0, 1 kept from the stopped run" in resumed.stdout
    assert not list((work / "train").glob(".resume-*"))  # cleared once the artifact is whole
    clean = subprocess.run(command(tmp_path / "clean"), capture_output=True, text=True, env=env)
    assert clean.returncode == 0, clean.stderr
    a, b = next((work / "train").glob("dense-*")), next((tmp_path / "clean" / "train").glob("dense-*"))
    assert a.name == b.name
    for name in ("oof.csv", "test_stg1.csv", "test_stg2.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    metrics = pd.read_csv(a / "metrics.csv")
    assert sorted(metrics.fold.unique()) == [0, 1, 2, 3, 4] and len(metrics) == 10
