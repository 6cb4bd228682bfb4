"""Nothing lost, nothing silent: bad inputs and faults, case by case, through the real CLI."""

import io
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


# A small pass: four photos a batch, and a second, randomly transformed view of each.
PASS = ["--set", "precompute.batch_size=4", "--set", "precompute.size=[160,160]", "--set", "precompute.tta={views: 2}"]


def _precompute_command(data, work, before: str = "") -> list[str]:
    """The pass as a process of its own: every run a test compares has the same threads, so the
    same floating-point sums (another thread count rounds some float16 values the other way)."""
    args = ["precompute", "-c", str(CONFIGS / "dense.yaml"), "--data", str(data), "--work", str(work), *PASS]
    return [sys.executable, "-c", f"import sys; {before}from fishcomp.cli import main; main({args!r})"]


def _stopped_pass(data, work, marker, at_batch: int, stop, before: str = ""):
    env = {**os.environ, "FISHCOMP_NO_PROGRESS": "1", "FISHCOMP_PAUSE_AT": f"precompute.batch:{at_batch}", "FISHCOMP_PAUSE_MARKER": str(marker)}
    process = subprocess.Popen(_precompute_command(data, work, before), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, preexec_fn=interruptible)
    # The stage pauses after that batch and says so (fishcomp/faults.py): the signal arrives
    # mid-way on any machine, however fast, instead of after a guessed sleep.
    wait_for_file(marker, process)
    stop(process)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def _finished_pass(data, work) -> tuple[str, list[np.ndarray]]:
    """The pass run to its end in `work`: (stdout, its arrays)."""
    finished = subprocess.run(_precompute_command(data, work), capture_output=True, text=True, env={**os.environ, "FISHCOMP_NO_PROGRESS": "1"})
    assert finished.returncode == 0, finished.stderr
    artifact = next((work / "precompute").glob("eff*"))
    return finished.stdout, [np.load(artifact / f"{split}{kind}.npy") for split in ("train", "test_stg1") for kind in ("_pooled", "_tta_pooled")]


@pytest.fixture(scope="module")
def uninterrupted_pass(tiny_data, tmp_path_factory) -> list[np.ndarray]:
    """The arrays of the pass never stopped (the `data` copies hold the same photos)."""
    stdout, arrays = _finished_pass(tiny_data, tmp_path_factory.mktemp("uninterrupted"))
    assert "resuming" not in stdout
    return arrays


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_precompute_resumes_where_it_stopped_and_ends_as_an_uninterrupted_pass(data, tmp_path, capsys, how, uninterrupted_pass):
    """Stopped after two batches of four photos: nothing looks finished, the eight photos' rows
    are kept, and the same command embeds only the rest; the arrays equal an uninterrupted pass's,
    bit for bit (the same batches, each photo's views seeded by its row)."""
    work = tmp_path / "work"
    code, stderr = _stopped_pass(data, work, tmp_path / "paused", 2, lambda process: process.send_signal(how))
    assert code == 130 and "interrupted" in stderr and "Traceback" not in stderr
    left = [p for p in (work / "precompute").iterdir() if not p.name.endswith(".lock")]
    assert [p.name.split("-")[0] for p in left] == [".resume"]  # no half artifact, no temporary folder
    with np.load(left[0] / "progress.npz") as kept:
        assert int(kept["done"]) == 8 and kept["ok"][:8].all() and not kept["ok"][8:].any()
    code, stdout, stderr = run_cli(["dag", "-c", CONFIGS / "dense.yaml", "--data", data, "--work", work, "--stage", "precompute", *PASS,
                                    "--format", "csv"], capsys)
    assert code == 0 and pd.read_csv(io.StringIO(stdout)).status.tolist() == ["to resume"], stderr
    resumed, arrays = _finished_pass(data, work)
    count = len(pd.read_csv(next((work / "precompute").glob("eff*/index.csv"))))
    assert f"resuming: 8 of {count} images kept from the stopped run" in resumed
    assert not list((work / "precompute").glob(".resume-*"))  # nothing left to resume once the artifact is whole
    # Its build time counts the stopped run's too (what `dag` says the artifact took).
    manifest = json.loads(next((work / "precompute").glob("eff*/manifest.json")).read_text())
    assert 0 < manifest["seconds_before_resume"] < manifest["seconds"]
    for resumed_array, clean_array in zip(arrays, uninterrupted_pass):
        np.testing.assert_array_equal(resumed_array, clean_array)


def test_a_killed_precompute_resumes_from_its_last_saved_progress(data, tmp_path, uninterrupted_pass):
    """kill -9 (out of memory, a pre-empted machine) runs no handler: what survives is the progress
    saved every `SAVE_EVERY_S` seconds of the pass (here every batch)."""
    work = tmp_path / "work"
    every_batch = "from fishcomp.features import PassProgress; PassProgress.SAVE_EVERY_S = 0; "
    _stopped_pass(data, work, tmp_path / "paused", 3, lambda process: process.kill(), every_batch)
    assert list((work / "precompute").glob(".tmp-*"))  # a hard kill leaves its temporary folder behind
    resumed, arrays = _finished_pass(data, work)
    assert "resuming: 12 of " in resumed and not list((work / "precompute").glob(".[tr]*-*"))
    for resumed_array, clean_array in zip(arrays, uninterrupted_pass):
        np.testing.assert_array_equal(resumed_array, clean_array)


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
    # Its build time counts the kept folds' training too (what `dag` says the artifact took).
    manifest = json.loads((a / "manifest.json").read_text())
    assert 0 < manifest["seconds_before_resume"] < manifest["seconds"]
    for name in ("oof.csv", "test_stg1.csv", "test_stg2.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    metrics = pd.read_csv(a / "metrics.csv")
    assert sorted(metrics.fold.unique()) == [0, 1, 2, 3, 4] and len(metrics) == 10
