"""Detect, then classify: crops from out-of-fold boxes, jittered annotated crops, the NoF blend."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import CONFIGS, SMALL, TINY, run_cli

from fishcomp.blending import blend_nof
from fishcomp.boxes import box_iou, covered
from fishcomp.cli import main
from fishcomp.config import load_config
from fishcomp.context import Context
from fishcomp.stages.crops import agreeing_folds, crop_rectangle, enlarge, fit_inside


# The box source crops.yaml names (a bbox config's name).
BOX_SOURCE = load_config(CONFIGS / "crops.yaml").config.crops.boxes.removesuffix(".yaml")
# crops.yaml at the tests' small sizes, cutting 4 boxes a photo instead of its 7: every path of the
# further crops runs (ranks, mixture, training on them, their mirrored views) at about half the crops
# to embed in every variant below. Not 3: the classifier trained on its further crops then met too
# few crops of deck to tell them apart from fish clearly on its validation photos (P(NoF) 0.47
# against 0.20 without them; 0.66 against 0.23 at 4, 0.81 against 0.23 at 7).
CROPS = [*SMALL, "crops.candidates.count=4"]


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def crops_run(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("crops")
    out = work / "submission.csv"
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in ["run", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, "--out", out, *_sets(CROPS)]])
    assert done.value.code == 0
    return work, out


def _folder(work, stage, name):
    return next((work / stage).glob(f"{name}-*/meta.json" if stage == "crops" else f"{name}-*/summary.json")).parent


def _fixture_artifact(work, data, stage, overrides=()):
    """The `stage` artifact crops_run built (crops.yaml with SMALL, and `overrides` for a variant),
    found by its key: other tests add variants beside it in the same work folder."""
    from fishcomp.pipeline import resolver

    settings = [*CROPS, *overrides]
    node = resolver(Context(data_dir=data, work_dir=work, overrides=settings)).plan(stage, load_config(CONFIGS / "crops.yaml", settings))
    return next((work / stage).glob(f"*-{node.key}"))


def test_the_crops_config_writes_a_validated_submission_with_the_nof_blend(crops_run, tiny_data, capsys):
    work, out = crops_run
    code, stdout, _ = run_cli(["validate", out, "--data", tiny_data], capsys)
    assert code == 0 and "valid test_stg1 submission, 24 rows" in stdout
    summary = json.loads((_fixture_artifact(work, tiny_data, "train") / "summary.json").read_text())
    blend = summary["nof_blend"]
    assert blend["whole"].startswith("linear_360x640_gem-") and blend["weight_setting"] == "auto" and 0 <= blend["weight"] <= 1
    assert summary["valid_logloss"] == pytest.approx(blend["blended"])
    assert summary["valid_logloss"] < summary["prior_logloss"]
    # The crop classifier trained on the original crop and two jittered copies per train image.
    assert summary["augment_copies"] == 2
    np.testing.assert_allclose(pd.read_csv(out).iloc[:, 1:].sum(axis=1), 1.0, atol=1e-4)


def test_a_runs_saved_config_reruns_it_from_its_artifacts_whatever_became_of_its_config_files(crops_run, tiny_data, tmp_path, capsys):
    """The config saved beside an artifact is a record of the run: its references (box source,
    NoF judge) name the artifacts they built by those artifacts' own saved configs, relative to
    the artifact, so running it again finds every artifact cached, without the config files and
    `--set` values it was first run with."""
    work, out = crops_run
    submission = _fixture_artifact(work, tiny_data, "submit")
    saved = submission / "config.yaml"
    settings = yaml.safe_load(saved.read_text())
    for reference, name in ((settings["crops"]["boxes"], BOX_SOURCE), (settings["crops"]["nof"]["whole"], "linear_360x640_gem")):
        target = (submission / reference).resolve()
        assert reference.startswith("../../train/") and target.parent.parent == (work / "train").resolve()
        assert target.parent.name.startswith(f"{name}-") and target.is_file()
    code, stdout, stderr = run_cli(["dag", "-c", saved, "--data", tiny_data, "--work", work, "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout))
    assert set(rows.status) == {"cached"} and set(rows[rows.stage == "train"].config) == {BOX_SOURCE, "linear_360x640_gem", "crops"}
    assert rows[rows.stage == "submit"].key.tolist() == [submission.name.rsplit("-", 1)[1]]
    code, stdout, stderr = run_cli(["cache", "gc", "--keep", submission, "--data", tiny_data, "--work", work, "--dry-run"], capsys)
    assert code == 0 and f"kept {len(rows)} reached by 1 config(s)" in stdout, stderr  # the run's whole graph, by its folder
    again = tmp_path / "again.csv"
    code, stdout, stderr = run_cli(["run", "-c", submission, "--data", tiny_data, "--work", work, "--out", again], capsys)  # the folder: its config
    assert code == 0, stderr
    assert " built " not in stdout and again.read_bytes() == out.read_bytes()


def test_stage_2_photos_arriving_after_a_run_are_predicted_by_its_fold_models_without_training_them_again(crops_run, tiny_data, tmp_path, capsys):
    """The competition's stage-2 photos arrive after stage 1, from new boats: rerunning with them
    takes every backbone pass's train and stage-1 rows and every head's fold models (the box
    source, the NoF judge, the crop classifier with its further crops and NoF blend) from the
    stage-1 run, embeds and predicts only what is new, and gives what a run over all the photos
    from scratch gives (the crops fixture, built on the same data: the same keys)."""
    import shutil

    import torch

    fresh_work, fresh_out = crops_run
    data, work, out = tmp_path / "data", tmp_path / "work", tmp_path / "submission.csv"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("test_stg2", "sample_submission_stg2.csv"))
    run = ["-c", CONFIGS / "crops.yaml", "--data", data, "--work", work, *_sets(CROPS)]
    code, _, stderr = run_cli(["run", *run, "--out", out], capsys)
    assert code == 0, stderr
    stage1 = {p.name.rsplit("-", 1)[0]: p for p in (work / "train").iterdir() if not p.name.startswith(".")}
    shutil.copytree(tiny_data / "test_stg2", data / "test_stg2")  # copies keep their times: the same photos
    shutil.copy2(tiny_data / "sample_submission_stg2.csv", data)

    code, stdout, stderr = run_cli(["dag", *run, "--format", "csv"], capsys)
    assert code == 0, stderr
    status = pd.read_csv(io.StringIO(stdout)).groupby("stage").status.agg(set)
    assert status["precompute"] == status["crops"] == status["train"] == {"to reuse"}
    code, stdout, stderr = run_cli(["run", *run, "--out", out], capsys)
    assert code == 0, stderr
    assert "precompute 128x224 reusing 144 of 156 images (train, test_stg1)" in stdout + stderr
    assert "crops 128x224 reusing 120 of 156 images (train)" in stdout + stderr  # the test photos' boxes are predicted anew
    assert (stdout + stderr).count("reusing fold model(s) 0, 1, 2 of") == 3

    (crops,) = [p for p in (work / "crops").iterdir() if (p / "meta.json").is_file() and json.loads((p / "meta.json").read_text()).get("reused_images")]
    ours, theirs = (pd.read_csv(p / "crop_boxes.csv") for p in (crops, fresh_work / "crops" / crops.name))
    pd.testing.assert_frame_equal(ours[ours.split == "train"], theirs[theirs.split == "train"])
    assert len(ours) == len(theirs)

    for name, earlier in stage1.items():
        (now,) = [p for p in (work / "train").glob(f"{name}-*") if p != earlier]
        assert (fresh_work / "train" / now.name).is_dir()  # the key a run from scratch gives
        assert json.loads((now / "manifest.json").read_text())["reused"] == {"from": earlier.name, "folds": [0, 1, 2]}
        for fold in range(3):
            kept, taken = (torch.load(p / "checkpoints" / f"fold{fold}.pt", weights_only=True)["state_dict"] for p in (earlier, now))
            assert all(torch.equal(kept[k], taken[k]) for k in kept)  # stage 1's very models
        assert (now / "oof.csv").read_bytes() == (earlier / "oof.csv").read_bytes()
        for split in ("test_stg1", "test_stg2"):
            ours = pd.read_csv(now / f"{split}.csv").set_index("image")
            theirs = pd.read_csv(fresh_work / "train" / now.name / f"{split}.csv").set_index("image")
            # Stage 2's photos (and their crops) go through the backbone in other batches than a
            # run from scratch puts them in: features one float16 step apart at most (see
            # test_precompute), which moves a probability far less than this.
            np.testing.assert_allclose(ours.to_numpy(), theirs.loc[ours.index].to_numpy(), atol=1e-3, err_msg=f"{name} {split}")
    for ours, theirs in ((out, fresh_out), (out.with_name("submission_stg2.csv"), fresh_out.with_name(f"{fresh_out.stem}_stg2.csv"))):
        assert ours.is_file() and theirs.is_file()
        np.testing.assert_allclose(pd.read_csv(ours).iloc[:, 1:].to_numpy(), pd.read_csv(theirs).iloc[:, 1:].to_numpy(), atol=1e-3)


def test_an_interrupted_crops_pass_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(crops_run, tiny_data, tmp_path, capsys, monkeypatch):
    """Crops cost more than the backbone pass they are cut for (several crops a photo): stopped
    after two batches, the same command embeds only the photos after them, and the artifact
    (embeddings, rectangles cut, readability) equals an uninterrupted pass's."""
    import shutil

    from fishcomp.stages import crops as crops_stage

    work, _ = crops_run
    args = ["run", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, "--stage", "crops",
            *_sets([*CROPS, "crops.margin=0.3", "precompute.batch_size=16"])]  # another crops key, the fixture's box source
    batches = []

    def stop_at_the_second_batch(name):
        batches.append(name)
        if len(batches) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(crops_stage, "pause_point", stop_at_the_second_batch)
    code, _, stderr = run_cli(args, capsys)
    assert code == 130 and "interrupted" in stderr
    stopped = list((work / "crops").glob(".resume-*"))
    assert len(stopped) == 1 and not list((work / "crops").glob(".tmp-*"))
    with np.load(stopped[0] / "progress.npz") as kept:
        assert int(kept["done"]) == 32
    monkeypatch.setattr(crops_stage, "pause_point", lambda name: None)
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "resuming: 32 of 156 images kept from the stopped run" in stdout and not list((work / "crops").glob(".resume-*"))
    resumed = next(p for p in (work / "crops").iterdir() if p.name.endswith(stopped[0].name.rsplit("-", 1)[1]))
    shutil.move(resumed, tmp_path / "resumed")
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0 and "resuming" not in stdout, stderr
    for name in sorted(p.name for p in (tmp_path / "resumed").glob("*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "resumed" / name), np.load(resumed / name), err_msg=name)
    for name in ("crop_boxes.csv", "index.csv"):
        assert (tmp_path / "resumed" / name).read_text() == (resumed / name).read_text()


def test_an_auto_nof_weight_is_the_share_with_the_lowest_out_of_fold_log_loss(crops_run, tiny_data, capsys):
    work, _ = crops_run
    code, stdout, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets([*CROPS, "crops.nof.weight=0.5"])], capsys)
    assert code == 0, stderr
    chosen, fixed = (json.loads((_fixture_artifact(work, tiny_data, "train", overrides) / "summary.json").read_text())["nof_blend"]
                     for overrides in ([], ["crops.nof.weight=0.5"]))
    assert chosen["weight_setting"] == "auto" and fixed["weight_setting"] == 0.5
    assert chosen["weight"] in np.linspace(0, 1, 21).round(2).tolist()
    code, stdout, _ = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets(CROPS)], capsys)
    assert code == 0 and f"P(NoF) weighted {chosen['weight']:g} by auto" in stdout
    # Among its candidates are the crop classifier alone (weight 0: the same numbers up to float64
    # rounding) and the fixed run's 0.5, so it is never worse than either. The two runs trained
    # the same seeded classifier (a CPU run repeats), so they agree to float32 rounding.
    assert chosen["blended"] <= chosen["crops_alone"] + 1e-9
    assert chosen["crops_alone"] == pytest.approx(fixed["crops_alone"], rel=1e-6)
    assert chosen["blended"] <= fixed["blended"] + 1e-6


def test_train_crops_come_from_out_of_fold_boxes(crops_run, tiny_data):
    """The original crop of train image i is cut around the box predicted by the bbox model of the
    fold that validated i, never one that trained on i."""
    import torch

    from fishcomp.context import training_precision
    from fishcomp.training.feature_sets import FeatureSet, predict, resident_dtype
    from fishcomp.training.folds import load_fold_model
    from fishcomp.training.map_projection import project

    work, _ = crops_run
    bbox = _folder(work, "train", BOX_SOURCE)
    oof = pd.read_csv(bbox / "oof.csv")
    boxes = pd.read_csv(bbox / "oof_boxes.csv")
    crops = pd.read_csv(_fixture_artifact(work, tiny_data, "crops") / "crop_boxes.csv")
    index = pd.read_csv(_fixture_artifact(work, tiny_data, "crops") / "index.csv")
    train_index = index[index.split == "train"].reset_index(drop=True)
    features_folder = next(p for p in (work / "precompute").iterdir() if (p / "train_map.npy").is_file())
    maps = np.load(features_folder / "train_map.npy")
    # The box source also looks at each photo's mirrored view (bbox_grid.yaml's `head.box_tta`).
    mirrored = np.load(features_folder / "train_tta_map.npy")[0]
    original = crops[(crops.split == "train") & (crops["copy"] == 0)].set_index("image")
    assert (original.source == "predicted (out of fold)").all()

    class Artifact:
        path = bbox

        def file(self, name):
            return bbox / name

    models = {fold: load_fold_model(Artifact(), fold, "cpu") for fold in sorted(oof.fold.unique())}
    config = load_config(CONFIGS / "crops.yaml").config.crops
    # The box source trained and predicted in its own precision (bf16 on a CPU that has it), on
    # its maps as training holds them (projected, then in memory in that type): so does this
    # check, through the same `predict`. A bf16 output carries 8 significant bits, and one image
    # alone may take another kernel than the run's batches, so the same box can differ by one
    # bf16 step: 2^-8 of a value below 1. In float32 the two agree to rounding (1e-5).
    dtype = training_precision(load_config(CONFIGS / f"{BOX_SOURCE}.yaml", SMALL), torch.device("cpu"))
    tolerance = 2**-8 if dtype is not None else 1e-5
    heads = {f: getattr(m, "head", m) for f, m in models.items()}
    projection = torch.load(bbox / "checkpoints" / "fold0.pt", weights_only=False).get("projection")
    if projection is not None:  # the maps were projected once before any fold trained
        maps = project(maps, projection["mean"].numpy(), projection["components"].numpy())
        mirrored = project(mirrored, projection["mean"].numpy(), projection["components"].numpy())
    for row in range(0, len(oof), 10):
        image, fold = oof.image[row], oof.fold[row]
        position = int(np.flatnonzero(train_index.image == image)[0])
        one = FeatureSet(maps[position : position + 1], np.arange(1), views=[mirrored[position : position + 1]])
        one.make_resident(resident_dtype(dtype, "cpu"), budget=1 << 30)
        predicted = {f: predict(h, one, "cpu", dtype=dtype)["box"][0] for f, h in heads.items()}
        np.testing.assert_allclose(boxes.loc[row, ["box_x", "box_y", "box_w", "box_h"]].to_numpy(dtype=float), predicted[fold], atol=tolerance)
        assert all(np.abs(predicted[f] - predicted[fold]).max() > 1e-4 for f in predicted if f != fold)
        width, height = train_index.width[position], train_index.height[position]
        expected = crop_rectangle(predicted[fold] * [width, height, width, height], config, width, height)
        # Whole pixels, plus the box's own tolerance grown by the margin and the squaring.
        slack = 1.0 + 4 * tolerance * max(width, height)
        np.testing.assert_allclose(original.loc[image, ["x", "y", "w", "h"]].to_numpy(dtype=float), expected, atol=slack)


def test_gem_pooled_crops_are_the_same_crops_pooled_above_their_average(crops_run, tiny_data, capsys):
    """`crops.pool: gem` (crops.yaml's) changes how each crop's map becomes its vector, nothing
    else: against the backbone's average (`crops.pool: null`), the same rectangles, another
    artifact, and every channel at least its average (the power mean inequality for p = 3 >= 1 on
    the backbone's non-negative ReLU6 cells)."""
    work, _ = crops_run
    code, stdout, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets([*CROPS, "crops.pool=null"])], capsys)
    assert code == 0, stderr
    assert "crops of 156 images, boxes from" in stdout
    average, gem = _fixture_artifact(work, tiny_data, "crops", ["crops.pool=null"]), _fixture_artifact(work, tiny_data, "crops")
    assert (json.loads((average / "meta.json").read_text())["pool"], json.loads((gem / "meta.json").read_text())["pool"]) == ("avg", "gem")
    assert pd.read_csv(average / "crop_boxes.csv").equals(pd.read_csv(gem / "crop_boxes.csv"))
    for name in ("train_pooled.npy", "train_aug_pooled.npy", "test_stg1_pooled.npy"):
        a, g = np.load(average / name).astype(np.float32), np.load(gem / name).astype(np.float32)
        assert a.shape == g.shape
        # Both vectors were rounded to float16 when stored (2^-11 relative) and, where the CPU
        # computes bf16, computed under bf16 autocast (the average's head pools in bf16: 2^-8):
        # 1 % bounds both.
        assert (g >= a * (1 - 1e-2) - 1e-3).all()
        # Not the average again: above it by more than twice the rounding bound on every crop
        # (GeM lifts each channel whose activity sits in a few cells).
        assert (g.mean(axis=-1) > 1.02 * a.mean(axis=-1)).all()
    assert len(list((work / "train").glob("crops-*/summary.json"))) >= 2


def _relative(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def _embedded_cuts(data, crops, boxes, split, copy, mirror, count=4):
    """The first `count` images of `split` in the crops artifact `crops`: the rectangle recorded
    for their crop `copy` cut from the photo (flipped left-right with `mirror`), resized and
    embedded as crops.yaml's precompute does, GeM-pooled."""
    import torch
    from PIL import Image, ImageOps

    from fishcomp.data.images import load_rgb
    from fishcomp.features import Embedder

    loaded = load_config(CONFIGS / "crops.yaml", CROPS)
    index = pd.read_csv(crops / "index.csv")
    rows = index[index.split == split].reset_index(drop=True).head(count)
    height, width = loaded.config.precompute.size
    cuts = []
    for image, path in zip(rows.image, rows.path):
        x, y, w, h = boxes[(boxes.image == image) & (boxes.split == split) & (boxes["copy"] == copy)][["x", "y", "w", "h"]].iloc[0]
        photo, _ = load_rgb(data / path)
        cut = photo.crop((x, y, x + w, y + h)).resize((width, height), Image.BILINEAR)
        cuts.append(np.asarray(ImageOps.mirror(cut) if mirror else cut))
    return Embedder(loaded.config.precompute, torch.device("cpu")).embed(torch.from_numpy(np.stack(cuts)), spatial=False, pool="gem")[0]


def test_mirrored_crops_are_a_test_time_view_that_the_classifier_averages(crops_run, tiny_data, capsys):
    """`crops.tta: mirror` (crops.yaml's): every out-of-fold and test crop is embedded again,
    flipped left-right, as a test-time view; the originals and the rectangles are those of the
    run without it (`crops.tta: null`), and the classifier's predictions average both views."""
    work, _ = crops_run
    assert load_config(CONFIGS / "crops.yaml").config.crops.tta == "mirror"
    mirrored_run = json.loads(_fixture_artifact(work, tiny_data, "train").joinpath("summary.json").read_text())
    mirrored = _fixture_artifact(work, tiny_data, "crops")
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets([*CROPS, "crops.tta=null"])], capsys)
    assert code == 0, stderr
    plain = _fixture_artifact(work, tiny_data, "crops", ["crops.tta=null"])
    boxes = pd.read_csv(plain / "crop_boxes.csv")
    assert boxes.equals(pd.read_csv(mirrored / "crop_boxes.csv"))

    for split in ("train", "test_stg1", "test_stg2"):
        original, view = np.load(mirrored / f"{split}_pooled.npy").astype(np.float32), np.load(mirrored / f"{split}_tta_pooled.npy")
        assert view.shape == (1, *original.shape) and not (plain / f"{split}_tta_pooled.npy").exists()
        # The same crops in the same batches: float16 storage and, where the CPU has it, bf16
        # autocast (2^-8 per rounding) bound any difference well inside 2 %.
        assert _relative(original, np.load(plain / f"{split}_pooled.npy").astype(np.float32)).max() < 0.02
    # The view is the mirrored crop: cut the recorded rectangle from the photo, flip it, embed it.
    expected = _embedded_cuts(tiny_data, mirrored, boxes, "test_stg1", 0, mirror=True)
    stored = np.load(mirrored / "test_stg1_tta_pooled.npy")[0, :4].astype(np.float32)
    original = np.load(mirrored / "test_stg1_pooled.npy")[:4].astype(np.float32)
    # Within the 2 % above (another batch size here), and far closer to the mirrored crop than
    # the unmirrored crop is.
    assert _relative(stored, expected).max() < 0.02
    assert (_relative(stored, expected) < 0.25 * _relative(original, expected)).all()
    plain_run = json.loads(_fixture_artifact(work, tiny_data, "train", ["crops.tta=null"]).joinpath("summary.json").read_text())
    assert (mirrored_run["tta_views"], plain_run["tta_views"]) == (2, 1)
    assert mirrored_run["valid_logloss"] != plain_run["valid_logloss"]
    # Without the view, the mirrored run's classifier is the plain run's where both train on the
    # same rows: same originals, same training. (With `candidates.train`, crops.yaml's, the
    # further crops' mirrored views are training copies too, so that comparison is made without it.)
    without_view = {}
    for overrides in ([], ["crops.tta=null"]):
        settings = [*overrides, "crops.candidates.train=false"]
        code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets([*CROPS, *settings])], capsys)
        assert code == 0, stderr
        summary = json.loads(_fixture_artifact(work, tiny_data, "train", settings).joinpath("summary.json").read_text())
        without_view[bool(overrides)] = summary["valid_logloss_without_tta"]
    assert without_view[False] == pytest.approx(without_view[True], abs=0.01)


def test_every_other_jittered_copy_is_mirrored(crops_run, tiny_data, capsys):
    """`crops.jitter.mirror: alternate` (crops.yaml's): the first jittered copy of each train image
    is flipped left-right before it is embedded, the second is not; the rectangles, the originals
    and their test-time views are those of the run without it."""
    work, _ = crops_run
    assert load_config(CONFIGS / "crops.yaml").config.crops.jitter.mirror == "alternate"
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work,
                               *_sets([*CROPS, "crops.jitter.mirror=null"])], capsys)
    assert code == 0, stderr
    mirrored = _fixture_artifact(work, tiny_data, "crops")
    plain = _fixture_artifact(work, tiny_data, "crops", ["crops.jitter.mirror=null"])
    assert not pd.read_csv(plain / "crop_boxes.csv").mirrored.any()
    boxes = pd.read_csv(mirrored / "crop_boxes.csv")
    # Exactly the train images' first jittered copies are marked, and every rectangle is the plain run's.
    assert boxes.mirrored.tolist() == ((boxes.split == "train") & (boxes["copy"] == 1)).tolist()
    assert boxes.drop(columns="mirrored").equals(pd.read_csv(plain / "crop_boxes.csv").drop(columns="mirrored"))
    # float16 storage (and bf16 autocast where the CPU has it) keep the same crops within 2 %.
    for name in ("train_pooled.npy", "test_stg1_pooled.npy", "train_tta_pooled.npy", "test_stg1_tta_pooled.npy"):
        assert _relative(np.load(mirrored / name).astype(np.float32), np.load(plain / name).astype(np.float32)).max() < 0.02, name
    copies, plain_copies = np.load(mirrored / "train_aug_pooled.npy").astype(np.float32), np.load(plain / "train_aug_pooled.npy").astype(np.float32)
    assert _relative(copies[1], plain_copies[1]).max() < 0.02
    # The first copy is its rectangle's cut mirrored: within the same 2 %, and far closer to it
    # than the plain run's unmirrored copy is.
    expected = _embedded_cuts(tiny_data, mirrored, boxes, "train", 1, mirror=True)
    assert _relative(copies[0, :4], expected).max() < 0.02
    assert (_relative(copies[0, :4], expected) < 0.25 * _relative(plain_copies[0, :4], expected)).all()


def test_each_fold_of_the_box_source_starts_at_its_training_boxes_median_size(tiny_data, tmp_path, capsys):
    """`head.box_start: median` reaches the folds' models: trained with a learning rate too small
    to move them, its out-of-fold boxes are about the annotated size, not half the photo."""
    from fishcomp.features import normalised_boxes

    still = [*SMALL, "train.phases=[{epochs: 1, lr: 1.0e-9}]"]
    code, _, err = run_cli(["train", "-c", CONFIGS / f"{BOX_SOURCE}.yaml", "--data", tiny_data, "--work", tmp_path, *_sets(still)], capsys)
    assert code == 0, err
    predicted = pd.read_csv(_folder(tmp_path, "train", BOX_SOURCE) / "oof_boxes.csv")
    index = pd.read_csv(next(p for p in (tmp_path / "precompute").iterdir() if (p / "index.csv").is_file()) / "index.csv")
    truth = normalised_boxes(index[index.split == "train"].set_index("image").loc[predicted.image].reset_index())
    have = ~np.isnan(truth).any(axis=1)
    ratio = np.median(predicted[["box_w", "box_h"]].to_numpy()[have], axis=0) / np.median(truth[have, 2:], axis=0)
    # The layers below the started logit add a few tenths to it (test_heads), well inside a factor
    # of 2; half the photo is 3-4 times these fish's median size.
    assert ((ratio > 0.5) & (ratio < 2)).all(), ratio


def test_a_locator_taught_every_fish_scores_its_boxes_against_the_nearest_one(tiny_data, tmp_path, capsys):
    """`head.box_targets: every`: the box source learns from every annotated fish (this data's
    photos hold up to three), so its out-of-fold IoU is each box's against the nearest fish, as
    re-derived here from `oof_boxes.csv` and the annotations, fold by fold."""
    from fishcomp.data.annotations import clip_box, load_annotations

    every = [*SMALL, "head.box_targets=every"]
    code, _, err = run_cli(["train", "-c", CONFIGS / f"{BOX_SOURCE}.yaml", "--data", tiny_data, "--work", tmp_path, *_sets(every)], capsys)
    assert code == 0, err
    folder = _folder(tmp_path, "train", BOX_SOURCE)
    predicted = pd.read_csv(folder / "oof_boxes.csv").set_index("image")
    folds = pd.read_csv(folder / "oof.csv").set_index("image").fold
    index = pd.read_csv(next(p for p in (tmp_path / "precompute").iterdir() if (p / "index.csv").is_file()) / "index.csv")
    annotations = load_annotations(tiny_data / "annos")
    nearest, several = {}, 0
    for name, width, height in index[index.split == "train"][["image", "width", "height"]].itertuples(index=False):
        fish = [b for b in (clip_box(box, width, height) for box in annotations.boxes.get(name) or []) if b is not None]
        if fish:
            truth = np.array([[b.x / width, b.y / height, b.w / width, b.h / height] for b in fish])
            nearest[name] = box_iou(np.repeat(predicted.loc[[name], ["box_x", "box_y", "box_w", "box_h"]].to_numpy(), len(fish), axis=0), truth).max()
            several += len(fish) > 1
    assert several >= 5  # the data does test what the setting is for
    per_fold = pd.Series(nearest).groupby(folds.loc[list(nearest)].to_numpy()).mean()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["head"] == "bbox" and summary["valid_iou"] == pytest.approx(per_fold.mean(), abs=1e-4)


def test_box_targets_every_needs_a_grid_locator(tiny_data, tmp_path, capsys):
    code, _, err = run_cli(["train", "-c", CONFIGS / "bbox.yaml", "--data", tiny_data, "--work", tmp_path, "--set", "head.box_targets=every"], capsys)
    assert code == 2 and "box_targets: every" in err and "box_from: grid" in err and "Traceback" not in err


def test_fold_boxes_that_point_elsewhere_are_left_out_of_the_test_box():
    fish, other = np.array([0.10, 0.10, 0.20, 0.10]), np.array([0.70, 0.60, 0.20, 0.10])
    nudge = np.array([0.01, 0.0, 0.0, 0.0])
    # Image 0: three folds on the fish, two on another; image 1: all five on the fish.
    folds = np.stack([np.stack([fish, fish]), np.stack([fish + nudge, fish + nudge]), np.stack([fish - nudge, fish]),
                      np.stack([other, fish]), np.stack([other + nudge, fish - nudge])])
    weights = agreeing_folds(folds)
    np.testing.assert_allclose(weights[:, 0], [1 / 3, 1 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(weights[:, 1], 0.2)
    consensus = np.einsum("fi,fic->ic", weights, folds)
    np.testing.assert_allclose(consensus[0], fish, atol=1e-9)
    assert box_iou(folds.mean(axis=0)[0], fish) < 0.05  # the plain mean lies between the two
    assert box_iou(np.array([0.0, 0.0, 0.2, 0.2]), np.array([0.1, 0.1, 0.2, 0.2])) == pytest.approx(0.01 / 0.07)


def test_test_crops_come_from_the_consensus_of_the_folds_boxes(crops_run, tiny_data):
    work, _ = crops_run
    bbox = _folder(work, "train", BOX_SOURCE)
    folds = np.load(bbox / "test_stg1_boxes_folds.npy")
    listed = pd.read_csv(bbox / "test_stg1_boxes.csv")
    assert folds.shape == (json.loads((bbox / "summary.json").read_text())["folds"], len(listed), 4)
    np.testing.assert_allclose(folds.mean(axis=0), listed[["box_x", "box_y", "box_w", "box_h"]].to_numpy(), atol=1e-6)
    consensus = np.einsum("fi,fic->ic", agreeing_folds(folds.astype(np.float64)), folds)
    # On these few, small images some folds point elsewhere, so the two rules cut other crops.
    assert np.abs(consensus - folds.mean(axis=0)).max() > 0.05
    index = pd.read_csv(_fixture_artifact(work, tiny_data, "crops") / "index.csv").set_index("image")
    crops = pd.read_csv(_fixture_artifact(work, tiny_data, "crops") / "crop_boxes.csv")
    cut = crops[(crops.split == "test_stg1") & (crops["copy"] == 0)].set_index("image")
    config = load_config(CONFIGS / "crops.yaml").config.crops
    for row, image in enumerate(listed.image):
        width, height = index.width[image], index.height[image]
        expected = crop_rectangle(consensus[row] * [width, height, width, height], config, width, height)
        np.testing.assert_allclose(cut.loc[image, ["x", "y", "w", "h"]].to_numpy(dtype=float), expected, atol=1.0)


def test_a_class_map_head_is_a_box_source_for_the_crops(tiny_data, tmp_path, capsys):
    """fcn's box (around its heatmap's peak) is scored like a box head's and cut like one: out of
    fold for train images, from the folds' consensus for test images."""
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", tmp_path, *_sets([*CROPS, "crops.boxes=fcn.yaml", "crops.candidates=null"])], capsys)
    assert code == 0, stderr
    fcn = _folder(tmp_path, "train", "fcn")
    summary = json.loads((fcn / "summary.json").read_text())
    assert 0 < summary["valid_iou"] <= 1
    boxes = pd.read_csv(fcn / "oof_boxes.csv")
    values = boxes[["box_x", "box_y", "box_w", "box_h"]].to_numpy()
    assert (values[:, 2:] > 0).all() and (values[:, :2] >= 0).all() and (values[:, :2] + values[:, 2:] <= 1 + 1e-9).all()
    # Not the whole image everywhere: the boxes come from where the maps peak.
    assert (values[:, 2] * values[:, 3] < 0.9).mean() > 0.5
    test_folds = np.load(fcn / "test_stg1_boxes_folds.npy")
    assert test_folds.shape == (summary["folds"], len(pd.read_csv(fcn / "test_stg1_boxes.csv")), 4)
    crops_folder = _folder(tmp_path, "crops", "crops")
    assert json.loads((crops_folder / "meta.json").read_text())["boxes_from"].startswith("fcn-")
    index = pd.read_csv(crops_folder / "index.csv").set_index("image")
    cut = pd.read_csv(crops_folder / "crop_boxes.csv")
    original = cut[(cut.split == "train") & (cut["copy"] == 0)].set_index("image")
    config = load_config(CONFIGS / "crops.yaml").config.crops
    for image, box in zip(boxes.image, values):
        width, height = index.width[image], index.height[image]
        expected = crop_rectangle(box * [width, height, width, height], config, width, height)
        np.testing.assert_allclose(original.loc[image, ["x", "y", "w", "h"]].to_numpy(dtype=float), expected, atol=1.0)


def test_crops_of_annotated_train_images_contain_the_drawn_fish(tiny_data, tmp_path):
    """Unjittered copies are cut around the annotated box (the fish's drawn pixels, in the synthetic
    data): every annotated fish lies inside its crop, and the crop's pixels are the photo's."""
    from PIL import Image

    from fishcomp.data.images import load_rgb
    from fishcomp.features import load_index
    from fishcomp.pipeline import build
    from fishcomp.stages.crops import CroppedImages, planned_boxes

    loaded = load_config(CONFIGS / "crops.yaml", ["crops.jitter={copies: 1, shift: 0, scale: 0}", *TINY])
    ctx = Context(data_dir=tiny_data, work_dir=tmp_path)
    index = load_index(build(ctx, "precompute", load_config(CONFIGS / "bbox.yaml", SMALL)))
    train = index[(index.split == "train") & index.box_w.notna()].reset_index(drop=True).head(12)
    fake_oof = tmp_path / "boxes"
    fake_oof.mkdir()
    pd.DataFrame({"image": index.image, "box_x": 0.1, "box_y": 0.1, "box_w": 0.2, "box_h": 0.2}).to_csv(fake_oof / "oof_boxes.csv", index=False)
    for split in ("test_stg1", "test_stg2"):
        pd.DataFrame({"image": index.image[index.split == split], "box_x": 0.1, "box_y": 0.1, "box_w": 0.2, "box_h": 0.2}).to_csv(fake_oof / f"{split}_boxes.csv", index=False)
    source = type("A", (), {"file": lambda self, name: fake_oof / name, "path": fake_oof})()
    planned, _, _ = planned_boxes(train, source, loaded.config.crops)
    images = CroppedImages(tiny_data, train.path.tolist(), planned, loaded.config.crops, (64, 64))
    for i in range(len(train)):
        crops, _, ok, rectangles, _ = images[i]
        assert ok
        x, y, w, h = rectangles[1].numpy()
        fish = train.loc[i, ["box_x", "box_y", "box_w", "box_h"]].to_numpy(dtype=float)
        assert x <= fish[0] + 0.5 and y <= fish[1] + 0.5
        assert x + w >= fish[0] + fish[2] - 0.5 and y + h >= fish[1] + fish[3] - 0.5
        photo, _ = load_rgb(tiny_data / train.path[i])
        region = photo.crop((int(x), int(y), int(x + w), int(y + h))).resize((64, 64), Image.BILINEAR)
        np.testing.assert_array_equal(crops[1].numpy(), np.asarray(region))


def test_with_jitter_fish_every_the_copies_take_turns_among_the_photos_fish(tiny_data, tmp_path):
    """`crops.jitter.fish: every`: in a photo with several annotated fish, copy k (unjittered
    here) is cut around fish k mod n, largest first, so each fish is a training crop."""
    from fishcomp.data.annotations import clip_box
    from fishcomp.features import load_index
    from fishcomp.pipeline import build
    from fishcomp.stages.crops import CroppedImages, planned_boxes

    loaded = load_config(CONFIGS / "crops.yaml", ["crops.jitter={copies: 3, shift: 0, scale: 0, fish: every}", *TINY])
    ctx = Context(data_dir=tiny_data, work_dir=tmp_path)
    annotations = ctx.annotations(loaded.config.data)
    index = load_index(build(ctx, "precompute", load_config(CONFIGS / "bbox.yaml", SMALL)))
    several = index.image.map(lambda name: len(annotations.boxes.get(name) or []) >= 2)
    train = index[(index.split == "train") & several].reset_index(drop=True).head(6)
    assert len(train) >= 3
    fake_oof = tmp_path / "boxes"
    fake_oof.mkdir()
    pd.DataFrame({"image": index.image, "box_x": 0.1, "box_y": 0.1, "box_w": 0.2, "box_h": 0.2}).to_csv(fake_oof / "oof_boxes.csv", index=False)
    source = type("A", (), {"file": lambda self, name: fake_oof / name, "path": fake_oof})()
    planned, _, _ = planned_boxes(train, source, loaded.config.crops, annotations)
    images = CroppedImages(tiny_data, train.path.tolist(), planned, loaded.config.crops, (64, 64))
    for i in range(len(train)):
        width, height = train.width[i], train.height[i]
        fish = sorted(annotations.boxes[train.image[i]], key=lambda box: box.area, reverse=True)
        rectangles = images[i][3]
        for k in range(3):
            box = clip_box(fish[k % len(fish)], width, height)
            x, y, w, h = rectangles[1 + k].numpy()
            assert x <= box.x + 0.5 and y <= box.y + 0.5
            assert x + w >= box.x + box.w - 0.5 and y + h >= box.y + box.h - 0.5
    # Without it, as before: every copy around the largest.
    planned_largest, _, _ = planned_boxes(train, source, load_config(CONFIGS / "crops.yaml", ["crops.jitter={copies: 3, shift: 0, scale: 0}"]).config.crops, annotations)
    np.testing.assert_allclose(planned_largest[:, 2], planned_largest[:, 1])
    assert not np.allclose(planned[:, 2], planned[:, 1])


def test_the_crop_cache_key_changes_with_the_box_source(tiny_data, tmp_path):
    from fishcomp.pipeline import resolver

    plan = resolver(Context(data_dir=tiny_data, work_dir=tmp_path, overrides=SMALL))
    loaded = load_config(CONFIGS / "crops.yaml", SMALL)
    crops = plan.node("crops", loaded)
    other = tmp_path / "bbox_l1.yaml"
    other.write_text(f"extends: {CONFIGS / 'bbox_grid.yaml'}\nhead: {{box_loss: smooth_l1}}\n")
    moved = tmp_path / "crops.yaml"
    moved.write_text(f"extends: {CONFIGS / 'crops.yaml'}\ncrops: {{boxes: bbox_l1.yaml, nof: {{whole: {CONFIGS / 'dense.yaml'}}}}}\n")
    other_crops = plan.node("crops", load_config(moved, SMALL))
    assert other_crops.inputs["boxes"].key != crops.inputs["boxes"].key
    assert other_crops.key != crops.key
    # Same source, other margin: another artifact too; a path spelled differently but naming the
    # same box source is not.
    assert plan.node("crops", load_config(CONFIGS / "crops.yaml", [*SMALL, "crops.margin=0.5"])).key != crops.key
    same = tmp_path / "same.yaml"
    same.write_text(f"extends: {CONFIGS / 'crops.yaml'}\ncrops: {{boxes: {CONFIGS / f'{BOX_SOURCE}.yaml'}}}\n")
    assert plan.node("crops", load_config(same, SMALL)).key == crops.key


def test_blend_nof_mixes_only_the_nof_probability():
    crop = np.array([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    whole = np.array([[0.1, 0.8, 0.1], [0.3, 0.1, 0.6]])
    blended = blend_nof(crop, whole, 0.5, nof=2)
    np.testing.assert_allclose(blended[:, 2], [0.15, 0.7])
    np.testing.assert_allclose(blended.sum(axis=1), 1.0)
    np.testing.assert_allclose(blended[:, 0] / blended[:, 1], crop[:, 0] / crop[:, 1])  # fish proportions kept
    np.testing.assert_allclose(blend_nof(crop, whole, 0.0, nof=2), crop)


def test_crop_geometry_grows_squares_and_stays_inside_the_photo():
    box = np.array([100.0, 50.0, 40.0, 20.0])
    grown = enlarge(box, 0.25, square=True)
    np.testing.assert_allclose(grown, [90.0, 30.0, 60.0, 60.0])  # 60 = 40 * 1.5, centred on (120, 60)
    np.testing.assert_allclose(enlarge(box, 0.0, square=False), box)
    np.testing.assert_allclose(fit_inside(np.array([-10.0, 690.0, 50.0, 50.0]), 1280, 720), [0.0, 670.0, 50.0, 50.0])
    np.testing.assert_allclose(fit_inside(np.array([-10.0, -10.0, 2000.0, 50.0]), 1280, 720), [0.0, 0.0, 1280.0, 50.0])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["head={kind: fcn}"], "use a head on pooled features"),
        (["crops.boxes=dense.yaml"], "must train a head that locates the fish"),
        (["crops.nof.weight=1.5"], "a share between 0 and 1, or auto"),
        (["crops.candidates.share=2"], "a share between 0 and 1, or auto"),
        (["crops.boxes=fcn.yaml"], "does not locate with a grid of cells"),
        (["crops.align=true"], "no head/tail points to turn them by"),
        (["crops.candidates=null", "crops.align=true", "crops.jitter.fish=every"], "only the largest fish's head and tail are known"),
    ],
)
def test_crops_config_mistakes_are_one_line_errors(tiny_data, tmp_path, capsys, overrides, message):
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", tmp_path, *_sets(overrides)], capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("kind, tolerance", [("DOL", 3.0), ("YFT", 3.0), ("ALB", 3.0), ("SHARK", 5.0)])
def test_alignment_turns_a_fish_with_known_head_and_tail_horizontal_head_left(kind, tolerance):
    """A synthetic fish at several angles, with its true head and tail: the aligned crop's fish
    pixels have a horizontal principal axis, and its eye is in the left half."""
    import math

    from PIL import Image

    from fishcomp.config import CropsConfig
    from fishcomp.data.synth import draw_fish, head_and_tail
    from fishcomp.stages.crops import aligned_crop

    rng = np.random.default_rng(1)
    deck = (0, 90, 160)
    for angle in (0, 37, 90, 150, 222, 300):
        upright = draw_fish(kind, 160, rng)
        fish = upright.rotate(angle, expand=True, resample=Image.BICUBIC)
        photo = Image.new("RGB", (640, 480), deck)
        x, y = 200, 120
        photo.paste(fish, (x, y), fish)
        (head_x, head_y), (tail_x, tail_y) = head_and_tail(upright, 160, angle, fish.size)
        left, top, right, bottom = fish.getchannel("A").getbbox()
        rectangle = crop_rectangle(np.array([x + left, y + top, right - left, bottom - top], dtype=float), CropsConfig(boxes="b.yaml", margin=0.1), 640, 480)
        crop = np.asarray(aligned_crop(photo, rectangle, np.array([x + head_x, y + head_y, x + tail_x, y + tail_y]))).astype(int)
        ys, xs = np.nonzero(np.abs(crop - np.array(deck)).sum(axis=2) > 60)
        major = np.linalg.eigh(np.cov(np.stack([xs, ys])))[1][:, -1]
        tilt = abs(math.degrees(math.atan2(major[1], major[0]))) % 180
        assert min(tilt, 180 - tilt) < tolerance, (angle, tilt)
        eye_columns = np.nonzero((crop < 40).all(axis=2))[1]  # the eye is the only near-black part
        assert eye_columns.mean() < crop.shape[1] / 2, angle


def test_aligned_crops_use_predicted_points_and_need_a_source_that_predicts_them(tiny_data, tmp_path, capsys):
    small = [*TINY, "precompute.size=[96,160]", "crops.nof=null", "crops.jitter.copies=1", "crops.jitter.fish=null", "crops.candidates=null"]  # smaller still
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", tmp_path,
                               *_sets([*small, "crops.boxes=bbox.yaml", "crops.align=true"])], capsys)
    assert code == 2 and "crops.align needs head/tail points" in stderr
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", tmp_path,
                               *_sets([*small, "crops.boxes=bbox_grid.yaml", "crops.align=true"])], capsys)
    assert code == 0, stderr
    bbox = json.loads((_folder(tmp_path, "train", "bbox_grid") / "summary.json").read_text())
    assert "valid_points_error" in bbox and (_folder(tmp_path, "train", "bbox_grid") / "test_stg1_points.csv").is_file()
    table = pd.read_csv(_folder(tmp_path, "crops", "crops") / "crop_boxes.csv")
    readable = table.dropna(subset=["x"])
    assert readable.turned_degrees.notna().all()  # every crop was turned by its points
    assert readable.turned_degrees.std() > 10  # by different amounts: the fish lie every way


def test_the_report_shows_the_crops_and_the_crop_classifier_next_to_the_whole_image_model(crops_run, tiny_data, capsys):
    work, _ = crops_run
    out = work / "report"
    code, _, stderr = run_cli(["report", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, "--out", out, *_sets(CROPS)], capsys)
    assert code == 0, stderr
    sheets = list(out.glob("crops-*_crops.png"))
    assert len(sheets) == 1 and sheets[0].stat().st_size > 10_000
    page = (out / "index.html").read_text()
    assert "crop classifier alone, valid log loss" in page and "whole-image model (linear_360x640_gem-" in page
    # crops.yaml's further boxes: what they bought, and where they were cut.
    assert "further boxes mixed in at share" in page and "the usual crop alone (before the NoF blend)" in page
    drawn = list(out.glob("crops-*_candidates.png"))
    assert len(drawn) == 1 and drawn[0].stat().st_size > 10_000


@pytest.fixture(scope="module")
def unannotated_data(tiny_data, tmp_path_factory):
    """The competition shipped no boxes (the lesson's came from its forum): data without annos/."""
    import shutil

    data = tmp_path_factory.mktemp("unannotated") / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("annos", "solution_boxes.csv"))
    return data


def test_without_box_annotations_the_box_source_and_its_crops_say_they_are_cut_blind(unannotated_data, tmp_path, capsys):
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", unannotated_data, "--work", tmp_path / "work", *_sets(CROPS)], capsys)
    # It still runs (a blend weighs such crops by their out-of-fold predictions), and says why they are poor.
    assert code == 0, stderr
    assert f"[{BOX_SOURCE}] no train image has a box" in stderr
    assert "[crops] no train image has a box" in stderr and "cut at untrained boxes" in stderr
    # Nothing tells which further crops hold a fish: the classifier trains without them, and says so.
    assert "[crops] crops.candidates.train ignored: no train image has a box" in stderr
    assert "candidate_crops_trained" not in json.loads((_folder(tmp_path / "work", "train", "crops") / "summary.json").read_text())
    summary = json.loads((_folder(tmp_path / "work", "train", BOX_SOURCE) / "summary.json").read_text())
    assert summary.get("valid_iou") is None  # no box to score it on


def test_without_box_annotations_an_ensemble_skips_its_crops_member_and_says_so(unannotated_data, tmp_path, capsys):
    config = tmp_path / "library.yaml"
    config.write_text(f"ensemble:\n  weights: auto\n  members:\n    - {{config: {CONFIGS / 'linear.yaml'}}}\n"
                      f"    - {{config: {CONFIGS / 'crops.yaml'}}}\n    - {{config: {CONFIGS / 'dense_probe.yaml'}}}\n")
    work = tmp_path / "work"
    code, stdout, stderr = run_cli(["run", "-c", config, "--data", unannotated_data, "--work", work, *_sets(SMALL)], capsys)
    assert code == 0, stderr
    assert stderr.count("member crops skipped: no train image has a box") == 1
    # Neither its box source nor its crops were built: no time spent on them.
    assert not list((work / "train").glob(f"{BOX_SOURCE}-*")) and not (work / "crops").exists()
    summary = json.loads(next((work / "ensemble").glob("library-*/summary.json")).read_text())
    assert [m["name"] for m in summary["members"]] == ["linear", "dense_probe"]
    assert [s["name"] for s in summary["skipped"]] == ["crops"] and "could not learn where the fish are" in summary["skipped"][0]["skipped"]
    assert "crops skipped" in stdout
    # Its saved config names the members by their artifacts' saved configs, and the one skipped
    # by its file: no artifact holds it, and run again on this data it is skipped again.
    blend = next((work / "ensemble").glob("library-*"))
    saved = [m["config"] for m in yaml.safe_load((blend / "config.yaml").read_text())["ensemble"]["members"]]
    assert [Path(s).parent.name.rsplit("-", 1)[0] for s in saved[::2]] == ["linear", "dense_probe"]
    assert all((blend / s).resolve().parent.parent == (work / "train").resolve() for s in saved[::2])
    assert saved[1] == str((CONFIGS / "crops.yaml").resolve())
    code, stdout, stderr = run_cli(["dag", "-c", blend / "config.yaml", "--data", unannotated_data, "--work", work, "--format", "csv"], capsys)
    assert code == 0 and set(pd.read_csv(io.StringIO(stdout)).status) == {"cached"}, stderr
    assert "member crops skipped" in stderr
    # The report lists it beside the members.
    code, _, stderr = run_cli(["report", "-c", config, "--data", unannotated_data, "--work", work, "--out", tmp_path / "report", *_sets(SMALL)], capsys)
    assert code == 0, stderr
    assert "members skipped" in (tmp_path / "report" / "index.html").read_text()
    # Given weights stay with their members when one before them is skipped.
    given = tmp_path / "given.yaml"
    given.write_text(f"ensemble:\n  members:\n    - {{config: {CONFIGS / 'crops.yaml'}, weight: 5}}\n"
                     f"    - {{config: {CONFIGS / 'linear.yaml'}, weight: 3}}\n    - {{config: {CONFIGS / 'dense_probe.yaml'}, weight: 1}}\n")
    code, _, stderr = run_cli(["run", "-c", given, "--data", unannotated_data, "--work", work, *_sets(SMALL)], capsys)
    assert code == 0, stderr
    summary = json.loads(next((work / "ensemble").glob("given-*/summary.json")).read_text())
    assert {m["name"]: m["weight"] for m in summary["members"]} == {"linear": 0.75, "dense_probe": 0.25}


def test_an_ensemble_whose_only_members_need_missing_boxes_is_a_one_line_error(unannotated_data, tmp_path, capsys):
    config = tmp_path / "crops_only.yaml"
    config.write_text(f"ensemble:\n  members:\n    - {{config: {CONFIGS / 'crops.yaml'}}}\n")
    code, _, stderr = run_cli(["run", "-c", config, "--data", unannotated_data, "--work", tmp_path / "work", *_sets(SMALL)], capsys)
    assert code == 2 and "no ensemble member can train on this data" in stderr and "Traceback" not in stderr


# -- further candidate boxes (`crops.candidates`) ---------------------------------------------------


def test_further_candidates_are_other_places_in_order_of_their_cells_probability():
    from fishcomp.stages.crops import next_candidates

    # Four cells' boxes (x, y, w, h fractions): A inside the usual box, B elsewhere, C a cell
    # whose centre lies inside B's box (the same fish again), D elsewhere again.
    cell_boxes = np.array([[0.10, 0.10, 0.10, 0.10], [0.60, 0.60, 0.20, 0.20], [0.65, 0.65, 0.10, 0.10], [0.10, 0.70, 0.10, 0.10]])
    probability = np.array([0.5, 0.3, 0.15, 0.05])
    usual = np.array([0.05, 0.05, 0.25, 0.25])
    boxes, weights = next_candidates(probability, cell_boxes, usual, count=3)
    np.testing.assert_allclose(boxes, cell_boxes[[1, 3]])
    np.testing.assert_allclose(weights, [0.5, 0.3, 0.05])
    # More candidates asked for than there are other places: the rest are empty and weigh nothing.
    boxes, weights = next_candidates(probability, cell_boxes, usual, count=5)
    assert np.isnan(boxes[2:]).all() and (weights[3:] == 0).all()
    # A usual box on none of the cells weighs as the best cell.
    _, weights = next_candidates(probability, cell_boxes, np.array([0.9, 0.0, 0.05, 0.05]), count=2)
    assert weights[0] == 0.5 and weights[1] == 0.5  # and the best cell (A) is the next place


def test_the_mixture_weighs_each_crop_by_its_cell_and_keeps_the_usual_crop_at_share_zero():
    from fishcomp.training.candidates import mixture

    first = np.array([[0.8, 0.2], [0.6, 0.4]])
    further = np.array([[[0.2, 0.8], [0.1, 0.9]]])  # one further candidate, (1, rows, classes)
    weights = np.array([[3.0, 1.0], [0.0, 0.0]])  # the second row has no cell map
    np.testing.assert_allclose(mixture(first, further, weights, 0.0), first)
    mixed = mixture(first, further, weights, 1.0)
    np.testing.assert_allclose(mixed[0], 0.75 * first[0] + 0.25 * further[0, 0])
    np.testing.assert_allclose(mixed[1], first[1])
    np.testing.assert_allclose(mixture(first, further, weights, 0.4)[0], 0.6 * first[0] + 0.4 * mixed[0])


def test_a_probes_inner_split_can_score_the_mixture_its_photos_will_get():
    """`crops.candidates.inner: mixture`: the held photos scored as they will be predicted, each
    crop's views averaged, the crops mixed by their cells' weights, at the best share allowed;
    only the held photos' rows and weights count."""
    from fishcomp.training.candidates import MixtureLoss

    labels = np.array([0, 1, 2])  # classes (fish A, NoF, fish B); photo 1 is never held
    usual = [np.array([[0.2, 0.7, 0.1], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]]), np.array([[0.4, 0.5, 0.1], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]])]
    further = [np.array([[0.8, 0.1, 0.1], [0.0, 0.0, 1.0], [0.3, 0.3, 0.4]]), np.array([[0.6, 0.3, 0.1], [0.0, 0.0, 1.0], [0.3, 0.3, 0.4]])]
    weights = np.array([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    held, probs_of = np.array([0, 2]), lambda rows: rows  # the rows are the probe's probabilities here
    # Photo 0: its usual crop's views average to (0.3, 0.6, 0.1), its further crop's to (0.7, 0.2,
    # 0.1); half and half: P(A) 0.5. Photo 2's further crop weighs nothing: P(B) 0.8.
    mixed = -(np.log(0.5) + np.log(0.8)) / 2
    alone = -(np.log(0.3) + np.log(0.8)) / 2
    loss = lambda shares: MixtureLoss(labels, [usual, further], weights, ("cells",), shares, 1, "mean")(held, probs_of)  # noqa: E731
    assert loss([1.0]) == pytest.approx(mixed) and loss([0.0]) == pytest.approx(alone)
    assert loss([0.0, 1.0]) == pytest.approx(min(mixed, alone))  # the best share allowed, as out of fold picks it


def test_weighted_by_what_the_classifier_sees_a_crop_of_deck_counts_less():
    """`candidates.weights`: each crop's cell weight times its 1 - P(NoF) (`fish`) or its most
    probable fish class's probability (`fish_class`); crops that all look equally empty keep
    the cells' proportions, and crops that say "certainly no fish" leave the usual crop alone."""
    from fishcomp.training.candidates import mixture, mixture_shares

    nof = 1  # classes (fish A, NoF, fish B)
    first = np.array([[0.2, 0.7, 0.1], [0.25, 0.5, 0.25]])
    further = np.array([[[0.6, 0.1, 0.3], [0.3, 0.5, 0.2]]])
    weights = np.array([[0.6, 0.2], [0.6, 0.2]])
    # Row 0, fish: 0.6 * 0.3 = 0.18 against 0.2 * 0.9 = 0.18, even; by the cells alone 3 to 1.
    np.testing.assert_allclose(mixture_shares(first, further, weights, "fish", nof), [[0.5, 0.5], [0.75, 0.25]])
    # fish_class: 0.6 * 0.2 = 0.12 against 0.2 * 0.6 = 0.12; row 1: 0.6 * 0.25 against 0.2 * 0.3.
    np.testing.assert_allclose(mixture_shares(first, further, weights, "fish_class", nof), [[0.5, 0.5], [0.15 / 0.21, 0.06 / 0.21]])
    np.testing.assert_allclose(mixture_shares(first, further, weights), [[0.75, 0.25], [0.75, 0.25]])
    np.testing.assert_allclose(mixture(first, further, weights, 1.0, "fish", nof)[0], 0.5 * first[0] + 0.5 * further[0, 0])
    empty = np.array([[0.0, 1.0, 0.0]])
    for rule in ("fish", "fish_class"):
        np.testing.assert_allclose(mixture_shares(empty, empty[None], weights[:1], rule, nof), [[1.0, 0.0]])


def test_weights_that_read_p_nof_on_data_without_nof_are_a_one_line_error():
    from types import SimpleNamespace

    from fishcomp.errors import FishcompError
    from fishcomp.training.candidates import mix_candidates

    for rule in ("fish", "fish_class"):
        loaded = load_config(CONFIGS / "crops.yaml", [f"crops.candidates.weights={rule}"])
        data = SimpleNamespace(loaded=loaded, classes=["ALB", "BET", "SHARK"])
        with pytest.raises(FishcompError, match=f"weights: {rule} reads each crop's P\\(NoF\\).*set candidates.weights: cells"):
            mix_candidates(data, None, {}, None)


def test_training_on_further_crops_without_nof_or_without_them_is_a_one_line_error(tmp_path):
    from types import SimpleNamespace

    from fishcomp.errors import FishcompError
    from fishcomp.training.candidates import candidate_rows

    loaded = load_config(CONFIGS / "crops.yaml", ["crops.candidates.train=true"])
    with pytest.raises(FishcompError, match="labels the crops that miss every fish NoF, but the data has no NoF class"):
        candidate_rows(SimpleNamespace(loaded=loaded, classes=["ALB", "BET"]), None, None)

    class Empty:  # a crops artifact made without `crops.candidates`
        path = tmp_path

        def file(self, name):
            return tmp_path / name

    with pytest.raises(FishcompError, match="holds no further crops: set crops.candidates.count"):
        candidate_rows(SimpleNamespace(loaded=loaded, classes=["ALB", "NoF"]), Empty(), None)


def test_each_cells_box_is_the_box_the_locator_decodes_at_its_best_cell():
    import torch

    from fishcomp.models.heads.dense import GridLocator

    generator = torch.Generator().manual_seed(0)
    cells, geometry = torch.randn(6, 3, 5, generator=generator), torch.rand(6, 4, 3, 5, generator=generator)
    probability, boxes = GridLocator.cell_boxes(GridLocator.cell_map(cells, geometry).numpy())
    np.testing.assert_allclose(probability.sum(axis=1), 1.0, rtol=1e-6)
    best = probability.argmax(axis=1)
    np.testing.assert_allclose(boxes[np.arange(6), best], GridLocator.decode(cells, geometry).numpy(), atol=1e-6)


def test_further_crops_unmirrored_embed_each_candidate_once_and_keep_the_usual_crops_view(crops_run, tiny_data, capsys):
    """`crops.candidates.mirror: false`: the further crops are embedded once each (no mirrored
    views: count - 1 fewer crops per photo), the same crops as the mirrored run's; the usual crop
    keeps its view; the classifier mixes them in as before. `mirror: true` is what the default
    does, so it reuses the default's artifact."""
    work, _ = crops_run
    overrides = ["crops.candidates.mirror=false"]
    code, stdout, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets([*CROPS, *overrides])], capsys)
    assert code == 0, stderr
    assert "further boxes per image, not mirrored)" in stdout
    mirrored, once = _fixture_artifact(work, tiny_data, "crops"), _fixture_artifact(work, tiny_data, "crops", overrides)
    assert mirrored != once
    assert _fixture_artifact(work, tiny_data, "crops", ["crops.candidates.mirror=true"]) == mirrored
    # Without the crops' view nothing is mirrored, so the setting changes nothing, key included.
    from fishcomp.pipeline import resolver

    def key(settings):
        settings = [*CROPS, *settings]
        return resolver(Context(data_dir=tiny_data, work_dir=work, overrides=settings)).plan("crops", load_config(CONFIGS / "crops.yaml", settings)).key

    assert key(["crops.tta=null", *overrides]) == key(["crops.tta=null"]) != key(["crops.tta=null", "crops.candidates.count=2"])
    for split in ("train", "test_stg1", "test_stg2"):
        assert not (once / f"{split}_candidates_tta_pooled.npy").exists() and (mirrored / f"{split}_candidates_tta_pooled.npy").is_file()
        # The same cuts through the same backbone, in other batches: float16 storage and bf16
        # autocast (where the CPU has it) keep them within 2 %, as for the mirrored copies above.
        for name in (f"{split}_candidates_pooled.npy", f"{split}_pooled.npy", f"{split}_tta_pooled.npy"):
            a, b = np.load(once / name).astype(np.float32), np.load(mirrored / name).astype(np.float32)
            assert a.shape == b.shape and _relative(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).max() < 0.02, name
    assert pd.read_csv(once / "crop_boxes.csv").equals(pd.read_csv(mirrored / "crop_boxes.csv"))
    assert json.loads((once / "meta.json").read_text())["candidates_mirrored"] is False
    summary = json.loads(_fixture_artifact(work, tiny_data, "train", overrides).joinpath("summary.json").read_text())
    count = load_config(CONFIGS / "crops.yaml", CROPS).config.crops.candidates.count
    assert summary["candidates"]["count"] == count and summary["candidates"]["mixed"] <= summary["candidates"]["usual_crop_alone"] + 1e-12


def test_the_crops_classifier_mixes_in_its_further_candidates_as_far_as_out_of_fold_says(crops_run, tiny_data):
    """crops.yaml's `candidates`: every image's next most probable boxes are cropped and embedded
    (and mirrored), and every fold model's predictions on its validation images are the mixture,
    re-derived here from the artifacts, before the NoF blend."""
    import torch

    from fishcomp.context import training_precision
    from fishcomp.training.candidates import SHARES, mixture, mixture_shares
    from fishcomp.training.feature_sets import FeatureSet, predict
    from fishcomp.training.folds import load_fold_model

    work, _ = crops_run
    count = load_config(CONFIGS / "crops.yaml", CROPS).config.crops.candidates.count
    crops = _fixture_artifact(work, tiny_data, "crops")
    trained = _fixture_artifact(work, tiny_data, "train")
    summary = json.loads((trained / "summary.json").read_text())
    chosen = summary["candidates"]
    assert chosen["count"] == count and chosen["share_setting"] == "auto" and chosen["share"] in SHARES.round(2).tolist()
    # crops.yaml's `weights: auto`: every rule tried, the lowest out of fold kept (and re-derived below).
    assert chosen["weights_setting"] == "auto" and set(chosen["by_rule"]) == {"cells", "fish", "fish_class"}
    assert chosen["mixed"] == min(r["mixed"] for r in chosen["by_rule"].values()) == chosen["by_rule"][chosen["weights"]]["mixed"]
    # Share 0 (the usual crop alone) is among those tried, so the chosen one is never worse.
    assert chosen["mixed"] <= chosen["usual_crop_alone"] + 1e-12
    index = pd.read_csv(crops / "index.csv")
    train_rows = int((index.split == "train").sum())
    further = np.load(crops / "train_candidates_pooled.npy")
    assert further.shape[:2] == (count - 1, train_rows) and np.load(crops / "train_candidates_tta_pooled.npy").shape == further.shape
    weights = np.load(crops / "train_candidate_weights.npy")
    assert weights.shape == (train_rows, count) and (weights >= 0).all() and (weights.sum(axis=1) <= 1 + 1e-6).all()
    table = pd.read_csv(crops / "crop_boxes.csv")
    assert table.source.str.startswith("candidate").sum() == (count - 1) * len(index)
    # The usual crop and the first further one are different places wherever the cell map offers one.
    usual = table[(table.split == "train") & (table["copy"] == 0)].set_index("image")
    second = table[table.source.str.startswith("candidate 2") & (table.split == "train")].set_index("image")
    offered = second.dropna(subset=["x"]).index
    assert len(offered) > 0
    assert (box_iou(usual.loc[offered, ["x", "y", "w", "h"]].to_numpy(), second.loc[offered, ["x", "y", "w", "h"]].to_numpy()) < 1).all()

    class Trained:
        path = trained

        def file(self, name):
            return trained / name

    oof = pd.read_csv(trained / "oof.csv")
    classes = list(oof.columns[3:])
    positions = pd.Series(np.arange(train_rows), index=index[index.split == "train"].image.to_numpy())[oof.image].to_numpy()
    usual_view = np.load(crops / "train_tta_pooled.npy")[0]
    mirrored = np.load(crops / "train_candidates_tta_pooled.npy")
    pooled = np.load(crops / "train_pooled.npy")
    expected = np.zeros((len(oof), len(classes)))
    stored_shares = np.load(trained / "oof_candidate_shares.npy")
    assert stored_shares.shape == (len(oof), count) and np.allclose(stored_shares.sum(axis=1), 1.0, atol=1e-5)
    # The classifier predicted in its training precision (bf16 autocast on a CPU that has it, where
    # one call's batch may take another kernel than the run's: one bf16 step of a logit, 2^-8,
    # moves a probability by less than that); in float32 the two agree to rounding.
    dtype = training_precision(load_config(CONFIGS / "crops.yaml", CROPS), torch.device("cpu"))
    tolerance = 2**-8 if dtype is not None else 1e-5
    for fold in sorted(oof.fold.unique()):
        model, rows = load_fold_model(Trained(), fold, "cpu"), np.flatnonzero(oof.fold == fold)
        sizes = np.zeros((len(rows), len(summary["size_vocabulary"]) + 1), np.float32)  # dense heads read no size

        def on(array, view):
            return predict(model, FeatureSet(array, positions[rows], sizes, views=[view]), "cpu", tta="mean", dtype=dtype)["probs"]

        first = on(pooled, usual_view)
        others = np.stack([on(further[k], mirrored[k]) for k in range(count - 1)])
        expected[rows] = mixture(first, others, weights[positions[rows]], chosen["share"], chosen["weights"], classes.index("NoF"))
        # The shares the report draws are the same mixture's.
        np.testing.assert_allclose(stored_shares[rows], mixture_shares(first, others, weights[positions[rows]], chosen["weights"], classes.index("NoF")), atol=tolerance)
    whole = pd.read_csv(next((work / "train").glob(f"{summary['nof_blend']['whole']}/oof.csv"))).set_index("image").loc[oof.image, classes]
    expected = blend_nof(expected, whole.to_numpy(), summary["nof_blend"]["weight"], classes.index("NoF"))
    np.testing.assert_allclose(oof[classes].to_numpy(), expected, atol=tolerance)


def test_further_crops_teach_their_fish_or_nof_by_how_much_of_a_fish_they_hold():
    """`crops.candidates.train`: a further crop holding most of an annotated fish teaches the
    photo's class, one missing every fish teaches NoF, one holding part of a fish nothing; a NoF
    photo's crops teach NoF; a fish photo without boxes, or a crop the cells ran out of, nothing."""
    from fishcomp.training.candidates import HOLDS_FISH, MISSES_FISH, candidate_labels

    nan = np.nan
    # Photos: 0 a fish of class 2 with two fish, 1 NoF, 2 class 0 without any annotated box.
    fish = np.array([[[0.10, 0.10, 0.20, 0.20], [0.60, 0.60, 0.10, 0.10]],
                     [[nan] * 4, [nan] * 4],
                     [[nan] * 4, [nan] * 4]])
    # (further crops, photos, 4): row k is each photo's crop k.
    rectangles = np.array([
        [[0.55, 0.55, 0.20, 0.20], [0.0, 0.0, 0.3, 0.3], [0.1, 0.1, 0.1, 0.1]],  # photo 0: all of fish 2
        [[0.15, 0.10, 0.20, 0.20], [0.5, 0.5, 0.1, 0.1], [nan] * 4],          # 3/4 of fish 1
        [[0.30, 0.10, 0.20, 0.20], [nan] * 4, [0.0, 0.0, 0.3, 0.3]],          # touching fish 1's edge only
        [[0.29, 0.10, 0.20, 0.20], [0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]],  # 5 % of fish 1
        [[0.20, 0.10, 0.20, 0.20], [0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]],  # half of fish 1
    ])
    np.testing.assert_allclose(covered(rectangles[:, 0], np.broadcast_to(fish[0], (5, 2, 4))), [1.0, 0.75, 0.0, 0.05, 0.5], atol=1e-9)
    assert MISSES_FISH > 0.05 and 0.5 < HOLDS_FISH <= 0.75
    labels = candidate_labels(np.array([2, 4, 0]), rectangles, fish, nof=4)
    np.testing.assert_array_equal(labels[:, 0], [2, 2, 4, 4, -1])
    np.testing.assert_array_equal(labels[:, 1], [4, 4, -1, 4, 4])  # NoF photo; its third crop the cells ran out of
    np.testing.assert_array_equal(labels[:, 2], [-1] * 5)
    # Each photo's crops train with it alone: a fold's training photos bring their own crops' rows.
    from fishcomp.training.candidates import CandidateRows

    extra = CandidateRows(np.zeros((4, 2)), None, np.array([4, 2, 4, 4]), np.array([0, 2, 2, 5]), {}, photos=6)
    np.testing.assert_array_equal(extra.widen(np.array([2, 3])), [2, 3, 7, 8])


def test_trained_on_its_further_crops_the_classifier_sees_deck_in_the_crops_that_miss(crops_run, tiny_data, capsys):
    """`crops.candidates.train` (crops.yaml's) through the CLI: turned off, only the crop
    classifier retrains (the crops are cached); turned on, the summary counts the further crops
    it trained on as re-derived from the crops' rectangles and the annotations, and its fold
    models call the crops that miss every fish NoF far more than the classifier trained without
    them."""
    from types import SimpleNamespace

    from fishcomp.data.annotations import load_annotations
    from fishcomp.features import every_fish_boxes
    from fishcomp.training.candidates import candidate_labels
    from fishcomp.training.feature_sets import FeatureSet, predict
    from fishcomp.training.folds import load_fold_model

    work, _ = crops_run
    overrides = ["crops.candidates.train=false"]
    code, stdout, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets([*CROPS, *overrides])], capsys)
    assert code == 0, stderr
    assert "crops      cached" in stdout  # (the classifier may be cached too: another test trains it so)
    crops = _fixture_artifact(work, tiny_data, "crops")
    trained = {name: _fixture_artifact(work, tiny_data, "train", o) for name, o in (("with", []), ("without", overrides))}
    assert trained["with"] != trained["without"]
    assert "candidate_crops_trained" not in json.loads((trained["without"] / "summary.json").read_text())
    summary = json.loads((trained["with"] / "summary.json").read_text())
    counts = summary["candidate_crops_trained"]

    index = pd.read_csv(crops / "index.csv")
    photos = index[(index.split == "train") & index.ok].reset_index(drop=True)
    oof = pd.read_csv(trained["with"] / "oof.csv")
    classes = list(oof.columns[3:])
    nof = classes.index("NoF")
    labels = np.array([classes.index(path.split("/")[1]) for path in photos.path])
    table = pd.read_csv(crops / "crop_boxes.csv").set_index(["image", "copy"])
    copies = json.loads((crops / "meta.json").read_text())["augment_copies"]
    further = np.load(crops / "train_candidates_pooled.npy").shape[0]
    scale = photos[["width", "height", "width", "height"]].to_numpy(float)
    rectangles = np.stack([table.loc[[(image, copies + 1 + k) for image in photos.image], ["x", "y", "w", "h"]].to_numpy(float) / scale for k in range(further)])
    expected = candidate_labels(labels, rectangles, every_fish_boxes(photos, load_annotations(tiny_data / "annos")), nof)
    fish_photo = labels != nof
    assert counts == {
        "fish": int(((expected >= 0) & (expected != nof)).sum()), "nof_in_fish_photos": int((expected == nof)[:, fish_photo].sum()),
        "nof_photos": int((expected == nof)[:, ~fish_photo].sum()), "left_out": int(((expected < 0) & ~np.isnan(rectangles).any(axis=-1)).sum()),
    }
    assert counts["fish"] > 0 and counts["nof_in_fish_photos"] > 0 and counts["left_out"] > 0

    # Fold 0's model on the crops that miss every fish, of its training photos and of its
    # validation photos (never trained on): P(NoF) by each classifier.
    assert len(photos) == int((index.split == "train").sum())  # every train photo of the tiny set is readable
    position = pd.Series(np.arange(len(photos)), index=photos.image)
    further_crops = np.load(crops / "train_candidates_pooled.npy")
    models = {name: load_fold_model(SimpleNamespace(path=folder, file=lambda name, folder=folder: folder / name), 0, "cpu") for name, folder in trained.items()}
    for part in (oof.fold != 0, oof.fold == 0):
        chosen = position.loc[oof.image[part]].to_numpy()
        crop, owner = np.nonzero((expected[:, chosen] == nof) & fish_photo[chosen])
        missing = further_crops[crop, chosen[owner]]
        seen = {name: predict(model, FeatureSet(missing, np.arange(len(missing))), "cpu")["probs"][:, nof].mean() for name, model in models.items()}
        # Taught that such crops are NoF, not the photo's fish: far above the other's belief
        # (about 0.8 against 0.2 on this set, trained and validation photos alike).
        assert seen["with"] > seen["without"] + 0.2, seen


def test_the_classifiers_probe_can_choose_its_strength_on_the_mixture_its_photos_get(crops_run, tiny_data, capsys):
    """`crops.candidates.inner: mixture` through the CLI: only the classifier retrains, each
    fold keeps the strength its (mixture-scored) inner split scored lowest, and those scores are
    not the usual crop's alone; a head with no probe to choose for is told so."""
    work, _ = crops_run
    inner = ["crops.candidates.inner=mixture"]
    code, stdout, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work, *_sets([*CROPS, *inner])], capsys)
    assert code == 0, stderr
    assert "crops      cached" in stdout
    trained = {name: _fixture_artifact(work, tiny_data, "train", o) for name, o in (("usual", []), ("mixture", inner))}
    assert trained["usual"] != trained["mixture"]
    choices = {}
    for name, folder in trained.items():
        metrics = pd.read_csv(folder / "metrics.csv")
        choices[name] = metrics[(metrics.epoch == 0) & metrics.inner_logloss.notna()].reset_index(drop=True)
    mixture = choices["mixture"]
    kept = mixture[mixture.chosen == True].set_index("fold").strength.sort_index()  # noqa: E712
    lowest = mixture.loc[mixture.groupby("fold").inner_logloss.idxmin()].set_index("fold").strength.sort_index()
    np.testing.assert_array_equal(kept.to_numpy(), lowest.to_numpy())
    # The same folds, strengths and inner splits; the held photos scored another way.
    np.testing.assert_array_equal(mixture[["fold", "strength"]], choices["usual"][["fold", "strength"]])
    assert not np.allclose(mixture.inner_logloss, choices["usual"].inner_logloss)

    code, _, stderr = run_cli(["train", "-c", CONFIGS / "crops.yaml", "--data", tiny_data, "--work", work,
                               *_sets([*CROPS, *inner, "crops.nof=null", "head.base=null"])], capsys)
    assert code == 2 and "crops.candidates.inner: mixture chooses a probe's strength" in stderr and "Traceback" not in stderr
