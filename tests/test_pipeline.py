"""End to end through the real CLI: synth -> run -> validate, caching, and error exits."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CONFIGS, SMALL, TINY, run_cli

from fishcomp.config import ClipConfig, load_config
from fishcomp.metrics import fold_mean_gain, log_loss
from fishcomp.models import backbones
from fishcomp.stages.calibrate import Calibration, fold_mean_ratio
from fishcomp.stages.submit import apply_clip


@pytest.fixture(scope="module")
def demo_run(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    out = work / "submission.csv"
    args = ["run", "-c", CONFIGS / "pipeline.yaml", "--data", tiny_data, "--work", work, "--out", out]
    for override in SMALL:
        args += ["--set", override]
    return work, out, args


# What the first, building run of demo_run printed, by work folder.
FIRST_RUN: dict = {}


@pytest.fixture
def built_run(demo_run, capsys):
    """demo_run after one complete run, whichever test made it: each test that reads a built
    pipeline passes alone too (`-k`) and in any order."""
    work, _, args = demo_run
    if work not in FIRST_RUN:
        code, stdout, stderr = run_cli(args, capsys)
        assert code == 0, stderr
        FIRST_RUN[work] = stdout
    return demo_run


def _printed_artifact(stdout: str, stage: str) -> Path:
    """The folder of the `stage` artifact a run printed (`<stage>  built|cached  <folder>  ...`):
    the run's own, whatever variants other tests left beside it."""
    return Path(next(line.split()[2] for line in stdout.splitlines() if line.split()[:1] == [stage]))


def _dag(args, capsys, *extra):
    """`fishcomp dag` with run's config, data, work and --set: {(stage, config): status}."""
    dag_args = ["dag", *[a for a in args[1:] if a != "--out" and not str(a).endswith(".csv")], "--format", "csv", *extra]
    code, stdout, stderr = run_cli(dag_args, capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout))
    assert list(rows.columns) == ["#", "stage", "config", "key", "status", "built_s", "last_build_s", "reads"]
    return {(row.stage, row.config): row.status for row in rows.itertuples()}


# The member library of configs/pipeline.yaml. One backbone pass per backbone, size and view set:
# under SMALL every pass is 128x224, so the 224 members read one lite0 pass, and the 360x640
# members (their view set: each photo and its mirror image) another, with the map, for fcn and
# the box source; lite1 has the same two, one for each view set. A node is named after the first
# config that asks for it.
LIBRARY = ["linear", "dense_probe", "linear_360x640", "linear_360x640_gem", "dense_360x640_probe", "fcn", "crops", "linear_lite1", "linear_lite1_360x640_gem"]
PIPELINE_NODES = {
    ("precompute", "linear"), ("precompute", "linear_360x640"), ("precompute", "linear_lite1"), ("precompute", "linear_lite1_360x640_gem"),
    *(("train", m) for m in LIBRARY),
    ("train", "bbox_grid_k64"), ("crops", "crops"), ("ensemble", "pipeline"), ("calibrate", "pipeline"), ("submit", "pipeline"),
}


def test_dag_lists_every_node_of_the_pipeline_to_build_on_a_fresh_work_folder(demo_run, tmp_path, capsys):
    _, _, args = demo_run
    work = tmp_path / "fresh"
    statuses = _dag([work if a == args[args.index("--work") + 1] else a for a in args], capsys)
    assert set(statuses) == PIPELINE_NODES
    assert set(statuses.values()) == {"to build"}
    assert not work.joinpath("train").exists()  # nothing was built


def test_every_360x640_member_and_the_box_source_read_one_pass_with_the_mirrored_view(tiny_data, tmp_path, capsys):
    """At the configs' own sizes (nothing is built: `dag` only plans): the 360x640 members, fcn
    and the crops' box source ask for one view set, so the pipeline makes one 360x640 pass, and
    it holds each photo's mirror image as a test-time view."""
    code, stdout, stderr = run_cli(["dag", "-c", CONFIGS / "pipeline.yaml", "--data", tiny_data, "--work", tmp_path, "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout))
    passes = rows[rows.stage == "precompute"]
    assert sorted(passes.config) == ["linear", "linear_360x640", "linear_lite1", "linear_lite1_360x640_gem"]
    at_360x640 = passes[passes.config == "linear_360x640"]["#"].item()
    readers = rows[rows.reads.fillna("").str.contains(f"features:#{at_360x640}(?!\\d)")]
    assert set(readers.config) == {"linear_360x640", "linear_360x640_gem", "dense_360x640_probe", "fcn", "bbox_grid_k64", "crops"}
    tta = load_config(CONFIGS / "fcn.yaml").config.precompute.tta
    assert tta.views == 2 and tta.transforms == [{"name": "HorizontalFlip", "p": 1.0}]
    for name in ("linear_360x640", "dense_360x640_probe", "bbox_grid_k64", "inception", "resblock"):
        assert load_config(CONFIGS / f"{name}.yaml").config.precompute.tta == tta, name


def test_run_writes_a_valid_submission_that_beats_the_prior(built_run, tiny_data, capsys):
    work, out, args = built_run
    assert FIRST_RUN[work].count("built") >= 6  # 2 precomputes, 2 trains, ensemble, submit
    code, stdout, stderr = run_cli(args, capsys)  # cached: this config's own submission, whatever ran since
    assert code == 0, stderr
    blend_folder = _printed_artifact(stdout, "ensemble")
    # One pass per backbone, size and view set (lite0 and lite1, each without and with the
    # mirrored view): the pooled-only 360x640 members read the map pass.
    assert len(list((work / "precompute").glob("eff*"))) == 4
    assert out.is_file() and out.with_name("submission_stg2.csv").is_file()
    code, stdout, _ = run_cli(["validate", out, "--data", tiny_data], capsys)
    assert code == 0 and "valid test_stg1 submission, 24 rows" in stdout
    score = float(stdout.split("log loss on")[1].split(":")[1])
    assert score < math.log(8) - 0.4  # the uniform prior scores ln 8 = 2.079
    code, stdout, _ = run_cli(["validate", out.with_name("submission_stg2.csv"), "--data", tiny_data], capsys)
    assert code == 0 and "valid test_stg2 submission, 36 rows" in stdout
    # Models trained on features, not on noise: the blend's out-of-fold log loss, estimated on
    # folds its weights never saw, beats the class prior. (Not every member does on 120 tiny
    # images: the probe-based ones are overconfident on one shifted fold here.)
    train = json.loads(next((work / "train").glob("dense_probe-*/summary.json")).read_text())
    blend = json.loads((blend_folder / "summary.json").read_text())
    assert blend["valid_logloss_cross_fitted"] < train["prior_logloss"]
    oof = pd.read_csv(next((work / "train").glob("dense_probe-*/oof.csv")))
    assert len(oof) == 120 and sorted(oof.fold.unique()) == [0, 1, 2]
    assert not oof.isna().any().any()
    np.testing.assert_allclose(pd.read_csv(out).iloc[:, 1:].sum(axis=1), 1.0, atol=1e-4)


def test_the_submission_is_the_calibrated_blend(built_run, capsys):
    """pipeline.yaml's calibrate section sits between the blend and the submission: the written
    rows are the blend's test log-probabilities divided by T' (plus the per-class shift, where the
    out-of-fold evidence kept one), the softmax, then clipped, where T' is the out-of-fold T scaled
    for a mean of fold models by the spread of the blend's fold copies."""
    work, out, args = built_run
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    blend_folder, calibrated = _printed_artifact(stdout, "ensemble"), _printed_artifact(stdout, "calibrate")
    summary = json.loads((calibrated / "summary.json").read_text())
    assert 0.25 <= summary["temperature"] <= 4.0
    assert summary["valid_logloss"] <= summary["valid_logloss_before"] + 1e-9  # fitted on these very rows
    assert math.isfinite(summary["valid_logloss_cross_fitted"])  # each fold scaled by a temperature fitted on the others
    clip = json.loads((_printed_artifact(stdout, "submit") / "summary.json").read_text())["clip_resolved"]
    blend = pd.read_csv(blend_folder / "test_stg1.csv")
    classes = list(blend.columns[1:])
    ratio = fold_mean_ratio(np.load(blend_folder / "test_stg1_probs_folds.npy").astype(np.float64))
    assert 1 / 3 <= ratio < 1  # three fold models that disagree somewhere
    assert summary["test_temperatures"]["test_stg1"] == pytest.approx(summary["temperature"] * ratio, rel=1e-6)
    test_temperature = summary["test_temperatures"]["test_stg1"]
    bias = None if summary["bias"] is None else np.array([summary["bias"][c] for c in classes])
    assert (bias is not None) == (summary["cross_fitted_by_kind"]["temperature_and_bias"] < summary["cross_fitted_by_kind"]["temperature"])  # bias: auto
    expected = apply_clip(Calibration(summary["temperature"], bias).apply(blend[classes].to_numpy(dtype=float), test_temperature), ClipConfig(**clip))
    written = pd.read_csv(out).set_index("image").loc[blend.image, classes].to_numpy()
    np.testing.assert_allclose(written, expected, atol=2e-6)  # the CSV's six decimals
    # So the check above can tell them apart: the blend as it was, and scaled by T alone.
    assert not np.allclose(test_temperature, 1.0, atol=1e-3) and not np.allclose(test_temperature, summary["temperature"], atol=1e-3)


def test_predict_gives_new_photos_what_the_calibrated_blend_gives_them_from_the_runs_own_fold_models(built_run, tiny_data, tmp_path, capsys):
    """`fishcomp predict` with the pipeline: the photos become the test images of the run's graph,
    whose every backbone pass, crops and member takes its train part and fold models from the
    finished run; the run's calibration (its stage-1 temperature) is applied. So a photo of the
    run's stage 1 gets the row the run wrote for it, whichever photos come with it, and nothing is
    left behind in the work folder."""
    import shutil

    work, _, args = built_run
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    calibrated = pd.read_csv(_printed_artifact(stdout, "calibrate") / "test_stg1.csv").set_index("image")
    names = calibrated.index[:3].tolist()
    photos = tmp_path / "photos"
    (photos / "other").mkdir(parents=True)
    for name in names:
        shutil.copy2(tiny_data / "test_stg1" / name, photos / name)
    shutil.copy2(tiny_data / "test_stg1" / calibrated.index[3], photos / "other" / names[0])  # the same name, another photo
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    before = sorted(p.relative_to(work) for p in work.rglob("*") if p.is_dir())
    out = tmp_path / "predicted.csv"
    predict = ["predict", "-c", CONFIGS / "pipeline.yaml", "--folder", photos, "--data", tiny_data, "--work", work, "--out", out, *args[args.index("--out") + 2:]]
    code, stdout, stderr = run_cli(predict, capsys)
    assert code == 0, stderr
    said = stdout + stderr
    assert "unreadable image skipped" in said and said.count("reusing fold model(s) 0, 1, 2 of") == 10  # 9 members and the box source
    predicted = pd.read_csv(out)
    assert [Path(p).relative_to(photos).as_posix() for p in predicted.image] == [*names, f"other/{names[0]}"]
    expected = calibrated.loc[[*names, calibrated.index[3]]]
    # The photos go through the backbone (and their crops through it again) in other batches than
    # the run put them in: features one float16 step apart at most (test_precompute), which moves
    # a probability far less than this.
    np.testing.assert_allclose(predicted[expected.columns].to_numpy(), expected.to_numpy(), atol=1e-3)
    assert sorted(p.relative_to(work) for p in work.rglob("*") if p.is_dir()) == before


def test_every_member_and_the_blend_keep_each_fold_models_test_predictions(built_run, capsys):
    """What `calibrate` measures the folds' spread on: each train artifact's fold copies average to
    its test CSV (the crops head's too, before its NoF blend, which is not linear), and the blend's
    fold copy f is the blend of the members' fold copies f."""
    work, _, args = built_run
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    members = [Path(line.split()[2]) for line in stdout.splitlines() if line.split()[:1] == ["train"]]
    assert len(members) == len(LIBRARY) + 1  # and the crops' box source
    for folder in members:
        for split, rows in (("test_stg1", 24), ("test_stg2", 12)):
            folds = np.load(folder / f"{split}_probs_folds.npy")
            assert folds.shape == (3, rows, 8), folder.name
            np.testing.assert_allclose(folds.sum(axis=2), 1.0, atol=1e-5)
            if not folder.name.startswith("crops-"):
                mean = pd.read_csv(folder / f"{split}.csv").iloc[:, 1:].to_numpy()
                np.testing.assert_allclose(folds.mean(axis=0), mean, atol=1e-6)  # float32 copies of float64 rows
    blend_folder = _printed_artifact(stdout, "ensemble")
    summary = json.loads((blend_folder / "summary.json").read_text())
    blend_folds = np.load(blend_folder / "test_stg1_probs_folds.npy")
    assert blend_folds.shape == (3, 24, 8)
    if summary["blend"] != "stack":  # a weighted mean: the mean of the blends is the blend of the means
        by_name = {m["artifact"]: m["weight"] for m in summary["members"]}
        expected = sum(by_name[f.name] * np.load(f / "test_stg1_probs_folds.npy").astype(np.float64) for f in members if f.name in by_name)
        np.testing.assert_allclose(blend_folds, expected, atol=1e-5)


def test_the_blend_says_what_each_member_took_to_build_alone_and_shared(built_run, tiny_data, capsys):
    """Each member's seconds in the blend's summary, from the artifacts' manifests: `seconds_own`,
    what no other member reads (what leaving it out of the config saves), and `seconds_shared`;
    the ensemble's line names the members at weight 0 and what only they need."""
    from fishcomp.context import Context
    from fishcomp.pipeline import resolver

    work, _, args = built_run
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    summary = json.loads((_printed_artifact(stdout, "ensemble") / "summary.json").read_text())
    members = {m["name"]: m for m in summary["members"]}
    plan = resolver(Context(data_dir=tiny_data, work_dir=work, overrides=SMALL))
    nodes = {n.name: n for n in plan.plan("ensemble", load_config(CONFIGS / "pipeline.yaml", SMALL)).inputs["members"]}

    def took(*found):
        return sum(json.loads((plan.ctx.cache.find(n.stage.name, n.key) / "manifest.json").read_text())["seconds"] for n in found)

    # The 224 probe: its training alone; the pass it reads serves dense_probe too.
    linear = nodes["linear"]
    assert members["linear"]["seconds_own"] == pytest.approx(took(linear), abs=0.051)
    assert members["linear"]["seconds_shared"] == pytest.approx(took(linear.inputs["features"]), abs=0.051)
    # The crops: the classifier, the crops and their box source are its own; the 360x640 pass
    # under them and its NoF judge (linear_360x640_gem, a member too) it shares.
    classifier = nodes["crops"]
    crops = classifier.inputs["features"]
    pass_360, box_source, judge = crops.inputs["features"], crops.inputs["boxes"], classifier.inputs["whole"]
    assert judge.key == nodes["linear_360x640_gem"].key
    assert members["crops"]["seconds_own"] == pytest.approx(took(classifier, crops, box_source), abs=0.051)
    assert members["crops"]["seconds_shared"] == pytest.approx(took(pass_360, judge), abs=0.051)
    # Lite1's 224 probe is the only member on Lite1's single-view pass: leaving it out saves that pass too.
    lite1 = nodes["linear_lite1"]
    assert members["linear_lite1"]["seconds_own"] == pytest.approx(took(lite1, lite1.inputs["features"]), abs=0.051)
    assert members["linear_lite1"]["seconds_shared"] == 0
    # The members at weight 0, together: what none of the weighted members needs. Linear's and
    # dense_probe's pass is neither's own, but it is theirs together.
    idle = [m["name"] for m in summary["members"] if round(m["weight"], 2) == 0]
    kept = [nodes[name] for name in nodes if name not in idle]
    needed = {(n.stage.name, n.key): n for name in nodes for n in plan.walk(nodes[name])}
    kept_needs = {(n.stage.name, n.key) for node in kept for n in plan.walk(node)}
    expected = took(*(n for found, n in needed.items() if found not in kept_needs))
    assert summary["at_weight_zero"]["members"] == idle
    assert summary["at_weight_zero"]["seconds_own"] == pytest.approx(expected, abs=0.051)
    line = next(line for line in stdout.splitlines() if line.startswith("ensemble"))
    if idle:
        assert f"at weight 0: {', '.join(idle)}, {summary['at_weight_zero']['seconds_own']:.0f} s to build what only they need" in line
    else:
        assert "at weight 0" not in line


def test_a_second_run_skips_every_stage_without_loading_a_model(built_run, capsys):
    work, out, args = built_run
    out.unlink(missing_ok=True)
    loads = backbones.MODEL_LOADS
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    stages = [line.split()[:2] for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in ("precompute", "train", "crops", "ensemble", "submit")]
    assert len(stages) >= 8 and all(word == "cached" for _, word in stages)  # every stage, crops included
    assert backbones.MODEL_LOADS == loads
    assert out.is_file()


def test_after_a_run_the_dag_is_all_cached_and_a_nof_weight_marks_only_the_crops_head_and_downstream(built_run, tmp_path, capsys):
    _, _, args = built_run
    assert set(_dag(args, capsys).values()) == {"cached"}
    # The same pipeline whose crops member blends NoF at another weight.
    (tmp_path / "crops.yaml").write_text(
        f"extends: {CONFIGS / 'crops.yaml'}\n"
        f"crops: {{boxes: {CONFIGS / 'bbox_grid_k64.yaml'}, nof: {{whole: {CONFIGS / 'dense_360x640_probe.yaml'}, weight: 0.3}}}}\n"
    )
    members = "".join(f"    - {{config: {'crops.yaml' if m == 'crops' else CONFIGS / f'{m}.yaml'}}}\n" for m in LIBRARY)
    (tmp_path / "pipeline.yaml").write_text(f"extends: {CONFIGS / 'pipeline.yaml'}\nensemble:\n  members:\n{members}")
    statuses = _dag([tmp_path / "pipeline.yaml" if a == CONFIGS / "pipeline.yaml" else a for a in args], capsys)
    to_build = {node for node, status in statuses.items() if status != "cached"}
    # The crops embedding (the expensive part) is not redone: only the head that blends NoF.
    assert to_build == {("train", "crops"), ("ensemble", "pipeline"), ("calibrate", "pipeline"), ("submit", "pipeline")}


def test_a_new_stage_is_reachable_by_name(built_run, tiny_data, tmp_path, capsys):
    """The README's worked example (fishcomp/stages/calibrate.py): temperature scaling of a run."""
    _, _, args = built_run
    work = args[args.index("--work") + 1]
    command = ["run", "-c", CONFIGS / "dense_360x640_probe.yaml", "--data", tiny_data, "--work", work, "--stage", "calibrate",
               "--set", "calibrate={bounds: [0.5, 2.0]}", *[a for o in SMALL for a in ("--set", o)]]
    code, stdout, stderr = run_cli(command, capsys)
    assert code == 0, stderr
    assert "calibrate  built" in stdout and "train      cached" in stdout  # the member the pipeline trained
    summary = json.loads(next((work / "calibrate").glob("dense_360x640_probe-*/summary.json")).read_text())
    assert 0.5 <= summary["temperature"] <= 2.0
    assert summary["valid_logloss"] <= summary["valid_logloss_before"] + 1e-9  # fitted on these very rows
    without_section = ["run", "-c", CONFIGS / "dense_360x640_probe.yaml", "--data", tiny_data, "--work", work, "--stage", "calibrate"]
    code, _, stderr = run_cli(without_section, capsys)
    assert code == 2 and "has no `calibrate` section" in stderr


def test_changing_the_blend_redoes_only_the_ensemble(built_run, capsys):
    work, out, args = built_run
    code, stdout, _ = run_cli(args + ["--set", "ensemble.method=geometric"], capsys)
    assert code == 0
    lines = {line.split()[0]: line.split()[1] for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in ("precompute", "train", "ensemble", "submit")}
    assert lines == {"precompute": "cached", "train": "cached", "ensemble": "built", "submit": "built"}


def test_fitted_weights_and_auto_clip_beat_their_baselines_and_write_gzip(built_run, tiny_data, capsys):
    work, out, args = built_run
    gz_out = out.with_name("fitted.csv")
    # The demo pipeline fits its weights and its clip; only the copy to --out changes here.
    code, stdout, stderr = run_cli([gz_out if a == out else a for a in args] + ["--gzip"], capsys)
    assert code == 0, stderr
    assert "built" not in stdout
    summary = json.loads((_printed_artifact(stdout, "ensemble") / "summary.json").read_text())
    assert summary["weights"] == "auto" and set(summary["candidates_cross_fitted"]) == {"fitted", "selection", "stack"}
    assert summary["blend"] == min(summary["candidates_cross_fitted"], key=summary["candidates_cross_fitted"].get)
    weights = [m["weight"] for m in summary["members"]]
    assert len(weights) == len(LIBRARY) and min(weights) >= 0 and abs(sum(weights) - 1) < 1e-6  # zeros listed too
    # Each member's label-free gain from the fold models' mean, from its own fold copies.
    for member in summary["members"]:
        folder = work / "train" / member["artifact"]
        stacked = np.concatenate([np.load(folder / f"{split}_probs_folds.npy") for split in ("test_stg1", "test_stg2")], axis=1)
        assert member["fold_mean_gain"] == pytest.approx(fold_mean_gain(stacked), rel=1e-6) and member["fold_mean_gain"] > 0
    if summary["blend"] == "stack":  # out of fold, each fold comes from a stacker that never saw it
        assert summary["valid_logloss"] == pytest.approx(summary["valid_logloss_cross_fitted"])
    else:  # fitted on the out-of-fold rows, the blend is never worse there than its best member
        assert summary["valid_logloss"] <= min(m["valid_logloss"] for m in summary["members"]) + 1e-9
    assert summary["valid_logloss_cross_fitted"] is not None
    # The blend's cross-fitted rows against its best member's, paired: what `fishcomp diff` says.
    versus, best = summary["versus_best_member"], min(summary["members"], key=lambda m: m["valid_logloss"])
    assert versus["member"] == best["name"] and versus["logloss_a"] == pytest.approx(best["valid_logloss"], rel=1e-9)
    assert versus["logloss_b"] == pytest.approx(summary["valid_logloss_cross_fitted"], rel=1e-9)
    assert versus["low"] <= versus["difference"] <= versus["high"] and versus["images"] == 120
    assert f"against {best['name']} alone" in stdout
    submit = json.loads((_printed_artifact(stdout, "submit") / "summary.json").read_text())
    assert submit["clip"]["kind"] == "auto"
    assert submit["oof_logloss_clipped"] <= submit["oof_logloss_raw"] + 1e-12
    assert submit["clip_used"] in stdout
    assert gz_out.with_name("fitted.csv.gz").is_file() and gz_out.with_name("fitted_stg2.csv.gz").is_file()
    code, stdout, _ = run_cli(["validate", gz_out.with_name("fitted_stg2.csv.gz"), "--data", tiny_data], capsys)
    assert code == 0 and "valid test_stg2 submission, 36 rows" in stdout


def test_diff_compares_a_blend_on_its_cross_fitted_rows_and_warns_where_it_has_none(built_run, tmp_path, capsys):
    """A blend fitted on its members' out-of-fold rows scores better on them than it would on new
    images; `fishcomp diff` pairs the rows of weights fitted without each fold, as the summary's
    versus_best_member does, and warns about a blend that kept none (built by an older fishcomp)."""
    import shutil

    work, _, _ = built_run
    blend = _printed_artifact(FIRST_RUN[work], "ensemble")
    summary = json.loads((blend / "summary.json").read_text())
    best = next(f for f in (work / "train").glob(f"{summary['versus_best_member']['member']}-*") if f.name in {m["artifact"] for m in summary["members"]})
    code, stdout, stderr = run_cli(["diff", best, blend, "--work", work, "--format", "csv"], capsys)
    assert code == 0 and "fitted on themselves" not in stderr, stderr
    every = pd.read_csv(io.StringIO(stdout)).set_index("scope").loc["all"]
    versus = summary["versus_best_member"]  # the table prints 4 decimals
    assert every.logloss_b == pytest.approx(summary["valid_logloss_cross_fitted"], abs=1e-4)
    assert every.difference == pytest.approx(versus["difference"], abs=1e-4) and every.images == versus["images"]
    older = tmp_path / "ensemble" / blend.name  # the same blend as an older fishcomp left it
    shutil.copytree(blend, older)
    (older / "oof_cross_fitted.csv").unlink()
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["files"]["oof_cross_fitted.csv"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, stderr = run_cli(["diff", best, older, "--work", work, "--format", "csv"], capsys)
    assert code == 0 and "fitted on themselves" in stderr and "rebuild it" in stderr
    assert pd.read_csv(io.StringIO(stdout)).set_index("scope").loc["all"].logloss_b == pytest.approx(summary["valid_logloss"], abs=1e-4)


@pytest.mark.parametrize("weights", ["fitted", "selection", "stack"])
def test_every_blend_kind_builds_and_scores_itself_honestly(built_run, capsys, weights):
    """`weights: auto` may choose any of them, on data where it wins; each must then build
    (the stacker writes its cross-fitted predictions over the members' out-of-fold ones)."""
    work, out, args = built_run
    code, _, stderr = run_cli([out.with_name(f"{weights}.csv") if a == out else a for a in args] + ["--set", f"ensemble.weights={weights}"], capsys)
    assert code == 0, stderr
    folder, summary = next(
        (p.parent, s) for p, s in ((p, json.loads(p.read_text())) for p in (work / "ensemble").glob("pipeline-*/summary.json")) if s["weights"] == weights
    )
    assert summary["blend"] == weights
    # The rows `fishcomp diff` and `runs` compare a blend on: each fold's from weights fitted on the others.
    crossed = pd.read_csv(folder / "oof_cross_fitted.csv")
    crossed = crossed[crossed.fold >= 0]
    assert log_loss(crossed.label.to_numpy(), crossed.iloc[:, 3:].to_numpy()) == pytest.approx(summary["valid_logloss_cross_fitted"], abs=1e-9)
    assert summary["valid_logloss_cross_fitted"] == pytest.approx(summary["candidates_cross_fitted"][weights])
    assert summary["versus_best_member"]["logloss_b"] == pytest.approx(summary["valid_logloss_cross_fitted"])
    if weights == "stack":  # its out-of-fold predictions are the cross-fitted ones
        assert summary["valid_logloss"] == pytest.approx(summary["valid_logloss_cross_fitted"])


def test_kaggle_upload_uses_the_kaggle_cli_after_validation(built_run, tmp_path, capsys, monkeypatch):
    work, out, args = built_run
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "kaggle"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 'Successfully submitted'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    submit = ["submit", *args[1:], "--kaggle", "-m", "first try"]
    code, stdout, stderr = run_cli(submit, capsys)
    assert code == 0, stderr
    sent = calls.read_text().split()
    assert sent[:4] == ["competitions", "submit", "-c", "the-nature-conservancy-fisheries-monitoring"]
    assert sent[5].endswith("submission_stg2.csv") and " ".join(sent[7:]) == "first try"
    assert "Successfully submitted" in stdout

    fake.write_text("#!/bin/sh\necho '401 - Unauthorized' >&2\nexit 1\n")
    code, _, stderr = run_cli(submit, capsys)
    assert code == 2 and "kaggle competitions submit failed: 401 - Unauthorized" in stderr

    fake.unlink()
    code, _, stderr = run_cli(submit, capsys)
    assert code == 2 and "pip install kaggle" in stderr and len(stderr.strip().splitlines()) == 1


def test_train_alone_builds_its_precompute(tiny_data, tmp_path, capsys):
    args = ["train", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", tmp_path]
    for override in TINY + ["split.kind=holdout", "train.phases=[{epochs: 2, lr: 0.001}]"]:
        args += ["--set", override]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "plan       dense: 2 to build (none built in this work folder before, so no estimate)"
    assert lines[1].startswith("precompute built")
    metrics = pd.read_csv(next((tmp_path / "train").glob("dense-*/metrics.csv")))
    assert list(metrics.epoch) == [1, 2] and metrics.valid_logloss.notna().all()
    assert len(list((tmp_path / "train").glob("dense-*/checkpoints/fold0.pt"))) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "-c", "nope.yaml"], "error: config file not found: nope.yaml"),
        (["run", "-c", CONFIGS / "dense.yaml", "--set", "train.batch_sise=3"], "unknown key `train.batch_sise`"),
        (["run", "-c", CONFIGS / "dense.yaml", "--set", "oops"], "expected dotted.key=value"),
        (["run", "-c", CONFIGS / "dense.yaml", "--data", "/no/such/dir"], "data folder not found: /no/such/dir"),
        (["validate", "/no/sub.csv", "--data", "/tmp"], "submission not found"),
        (["ensemble", "-c", CONFIGS / "dense.yaml"], "has no `ensemble` section"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, message, capsys):
    code, _, stderr = run_cli(args, capsys)
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(capsys):
    code, _, stderr = run_cli(["--debug", "run", "-c", "nope.yaml"], capsys)
    assert code == 2 and "Traceback" in stderr


def test_check_prints_the_leakage_table(tiny_data, capsys):
    code, stdout, _ = run_cli(["check", "--data", tiny_data], capsys)
    assert code == 0
    assert "train image size x class" in stdout and "256x144" in stdout
    assert "unreadable files: 0" in stdout


def test_a_bad_device_is_a_one_line_error(tiny_data, tmp_path, capsys):
    args = ["precompute", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", tmp_path, "--set", "precompute.device=tpu9"]
    code, _, stderr = run_cli(args, capsys)
    assert code == 2 and "device `tpu9` is not a torch device" in stderr
