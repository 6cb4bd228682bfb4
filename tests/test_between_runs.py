"""The loop a competitor lives in between runs, through the real CLI: sweeps, the runs table, the
resolved config, predictions for any photo, the cache's housekeeping, the version."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import CONFIGS, TINY, run_cli

from fishcomp import __version__

QUICK = ["split.kind=holdout", "train.phases=[{epochs: 2, lr: 1.0e-3}]", "train.batch_size=32"]


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory):
    """Three learning rates of the dense head, one command."""
    work = tmp_path_factory.mktemp("sweep")
    with pytest.raises(SystemExit) as done:
        from fishcomp.cli import main

        main([str(a) for a in ["train", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", work,
                               *_sets([*QUICK, "train.phases.0.lr=1e-3,3e-4,1e-4"])]])
    assert done.value.code == 0
    return work


def test_a_comma_list_sweeps_three_trainings_and_the_runs_table_lists_them_with_their_difference(swept, capsys):
    artifacts = sorted((swept / "train").glob("dense-*"))
    assert len(artifacts) == 3
    lrs = sorted(yaml.safe_load((a / "config.yaml").read_text())["train"]["phases"][0]["lr"] for a in artifacts)
    assert lrs == [1e-4, 3e-4, 1e-3]
    code, stdout, stderr = run_cli(["runs", "--work", swept, "--format", "csv", "--sort", "valid_logloss"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout))
    trains = rows[rows.stage == "train"]
    assert len(trains) == 3 and list(trains.valid_logloss) == sorted(trains.valid_logloss)
    # The setting that differs between them, and nothing else.
    assert all(d.startswith("train.phases.0.lr=") and " " not in d for d in trains.differs)
    assert trains.differs.nunique() == 3
    summaries = {json.loads((a / "summary.json").read_text())["valid_logloss"] for a in artifacts}
    assert set(trains.valid_logloss.round(4)) == {round(v, 4) for v in summaries}
    # Each run against the best of the three, paired on the same validation images.
    assert list(trains.vs_best)[0] == "best"
    for _, run in trains.iloc[1:].iterrows():
        difference, low, high = (float(x) for x in run.vs_best.replace("[", "").replace("]", "").replace(",", "").split())
        assert difference == pytest.approx(run.valid_logloss - trains.valid_logloss.iloc[0], abs=2e-4) and difference >= 0
        assert low <= difference <= high
    code, stdout, _ = run_cli(["runs", "--work", swept], capsys)
    assert code == 0 and stdout.count("dense") >= 3  # the rich table, for people
    code, _, stderr = run_cli(["runs", "--work", swept, "--sort", "valid_loglos"], capsys)
    assert code == 2 and "did you mean valid_logloss" in stderr


def test_blends_of_one_config_differ_in_the_member_artifacts_they_blended(tiny_data, tmp_path, capsys):
    """Two blends of one config over members trained at two rates: the blend's own settings are
    the same, its members are not. Each blend's saved config names the artifacts it blended, so
    the runs table says so (before, it showed no difference between them)."""
    config = tmp_path / "pair.yaml"
    config.write_text(f"name: pair\nensemble:\n  weights: fitted\n  members:\n"
                      f"    - {{config: {CONFIGS / 'dense.yaml'}}}\n    - {{config: {CONFIGS / 'linear.yaml'}}}\n")
    work = tmp_path / "work"
    code, _, stderr = run_cli(["run", "-c", config, "--data", tiny_data, "--work", work, *_sets([*QUICK, "train.phases.0.lr=1e-3,3e-4"])], capsys)
    assert code == 0, stderr
    code, stdout, stderr = run_cli(["runs", "--work", work, "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout))
    blends = rows[rows.stage == "ensemble"]
    assert len(blends) == 2
    for blend in blends.itertuples():
        saved = yaml.safe_load(next((work / "ensemble").glob(f"pair-{blend.key}")).joinpath("config.yaml").read_text())
        members = [Path(m["config"]).parent.name for m in saved["ensemble"]["members"]]
        assert [m.rsplit("-", 1)[0] for m in members] == ["dense", "linear"]
        assert blend.differs == " ".join(f"ensemble.members.{i}.config=train/{m}" for i, m in enumerate(members))
    trained = {f"train/{r.name}-{r.key}" for r in rows[rows.stage == "train"].itertuples()}
    assert {m for d in blends.differs for m in re.findall(r"=(\S+)", d)} == trained


def test_the_runs_table_says_which_machine_built_each_run_where_they_differ(swept, tmp_path, capsys):
    """Seconds, and a score's last digits, depend on the machine (a laptop's CPU against a Kaggle
    GPU, bf16 against float32): every artifact records its machine, and the table names them
    once the work folder holds runs from more than one."""
    import shutil

    from fishcomp.context import describe_machine

    for manifest in swept.glob("*/*/manifest.json"):
        assert json.loads(manifest.read_text())["machine"] == describe_machine()
    code, stdout, _ = run_cli(["runs", "--work", swept], capsys)
    assert code == 0 and "machine" not in stdout  # one machine: nothing to tell apart, no column
    code, stdout, _ = run_cli(["runs", "--work", swept, "--format", "csv"], capsys)
    assert set(pd.read_csv(io.StringIO(stdout)).machine) == {describe_machine()}  # scripts always get it
    work = tmp_path / "work"  # a copy: the other tests keep the sweep as it was built
    shutil.copytree(swept, work)
    elsewhere = _by_lr(work, 1e-4) / "manifest.json"
    manifest = json.loads(elsewhere.read_text())
    other = "a Kaggle notebook's GPU"
    elsewhere.write_text(json.dumps({**manifest, "machine": other}))
    code, stdout, stderr = run_cli(["runs", "--work", work], capsys)
    assert code == 0, stderr
    # A label a machine in the table, the legend under it the machine's line.
    legend = dict(line.strip().split(": ", 1) for line in stdout.splitlines() if line[:3] in ("A: ", "B: "))
    assert sorted(legend.values()) == sorted([describe_machine(), other])
    label = {machine: letter for letter, machine in legend.items()}
    rows = [line for line in stdout.splitlines() if "│ dense" in line]
    assert len(rows) == 3  # the three trainings
    for row in rows:
        assert f"│ {label[other if manifest['key'] in row else describe_machine()]} " in row
    code, stdout, _ = run_cli(["runs", "--work", work, "--format", "csv"], capsys)
    rows = pd.read_csv(io.StringIO(stdout), dtype={"key": str}).set_index("key")
    assert rows.loc[manifest["key"], "machine"] == other
    assert (rows.drop(manifest["key"]).machine == describe_machine()).all()


def test_runs_on_a_cleaned_copy_of_the_data_differ_in_their_data(swept, tiny_data, tmp_path, capsys):
    """A doubtful photo taken out of train changes no setting, only the data: the runs table and
    diff say so instead of showing two runs of identical settings with different scores."""
    import shutil

    cleaned = tmp_path / "cleaned"
    shutil.copytree(tiny_data, cleaned)
    sorted((cleaned / "train" / "ALB").glob("*.jpg"))[0].unlink()
    work = tmp_path / "work"  # a copy: the other tests keep the sweep as it was built
    shutil.copytree(swept, work)
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "dense.yaml", "--data", cleaned, "--work", work, *_sets(QUICK)], capsys)
    assert code == 0, stderr
    code, stdout, _ = run_cli(["runs", "--work", work, "--format", "csv"], capsys)
    trains = pd.read_csv(io.StringIO(stdout), dtype={"key": str}).query("stage == 'train'").set_index("key")
    assert len(trains) == 4
    data = {key: re.search(r"(?:^| )data=(\S+)", differs).group(1) for key, differs in trains.differs.items()}
    first = {a.name.rsplit("-", 1)[1] for a in (swept / "train").glob("dense-*")}  # the sweep's, on the data as generated
    (new,) = set(data) - first
    assert {data[key] for key in first} == {f"{tiny_data.name}@{data[next(iter(first))].split('@')[1]}"}
    assert data[new].startswith("cleaned@") and data[new].split("@")[1] != data[next(iter(first))].split("@")[1]
    # The same learning rate on both: diff pairs them on the images they share and names the data.
    same_lr = _by_lr(swept, 1e-3).name.rsplit("-", 1)[1]
    code, stdout, stderr = run_cli(["diff", same_lr, new, "--work", work], capsys)
    assert code == 0, stderr
    assert f"settings that differ (A -> B): data: {data[same_lr]} -> {data[new]}\n" in stdout


def _by_lr(work, lr):
    return next(a for a in (work / "train").glob("dense-*")
                if yaml.safe_load((a / "config.yaml").read_text())["train"]["phases"][0]["lr"] == lr)


def test_runs_with_the_answers_shows_each_runs_test_scores(swept, tiny_data, tmp_path, capsys):
    """Once a stage's answers are out (a released solution; synthetic data's solution.csv), the
    runs table shows what each run scores on each test stage."""
    from fishcomp.metrics import log_loss

    truth = pd.read_csv(tiny_data / "solution.csv").set_index("image")
    code, stdout, stderr = run_cli(["runs", "--work", swept, "--solution", tiny_data / "solution.csv", "--sort", "test_stg1", "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout)).set_index("key")
    assert list(rows.test_stg1) == sorted(rows.test_stg1)
    for folder in (swept / "train").glob("dense-*"):
        for split in ("test_stg1", "test_stg2"):
            predicted = pd.read_csv(folder / f"{split}.csv").set_index("image")
            expected = log_loss(truth.loc[predicted.index].to_numpy().argmax(axis=1), predicted[truth.columns].to_numpy())
            assert rows.loc[folder.name.rsplit("-", 1)[1], split] == pytest.approx(expected, abs=1e-4)
    code, stdout, _ = run_cli(["runs", "--work", swept, "--format", "csv"], capsys)
    assert code == 0 and "test_stg1" not in stdout.splitlines()[0]  # without the answers, no test columns
    code, _, stderr = run_cli(["runs", "--work", swept, "--sort", "test_stg1"], capsys)
    assert code == 2 and "need --solution" in stderr
    code, _, stderr = run_cli(["runs", "--work", swept, "--solution", tmp_path / "none.csv"], capsys)
    assert code == 2 and "no solution" in stderr and "Traceback" not in stderr


def test_dag_and_run_say_how_long_the_next_value_of_a_sweep_took_last_time(swept, tiny_data, tmp_path, capsys):
    """Before a run: what is left to build and how long the same config's last build here took."""
    import shutil

    newest = max((json.loads((a / "manifest.json").read_text()) for a in (swept / "train").glob("dense-*")), key=lambda m: m["created"])
    args = ["-c", CONFIGS / "dense.yaml", "--data", tiny_data, *_sets([*QUICK, "train.phases.0.lr=2e-3"])]
    code, stdout, stderr = run_cli(["dag", *args, "--work", swept, "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout)).set_index("stage")
    # A cached node says how long it took to build itself (its manifest's seconds), one to build
    # how long the last build of its config took.
    (pass_manifest,) = [json.loads(m.read_text()) for m in (swept / "precompute").glob("*/manifest.json")]
    assert rows.loc["precompute", "status"] == "cached" and pd.isna(rows.loc["precompute", "last_build_s"])
    assert rows.loc["precompute", "built_s"] == round(pass_manifest["seconds"], 1)
    assert rows.loc["train", "status"] == "to build" and rows.loc["train", "last_build_s"] == round(newest["seconds"], 1)
    assert pd.isna(rows.loc["train", "built_s"])
    code, stdout, _ = run_cli(["dag", *args, "--work", swept], capsys)
    assert code == 0 and "2 to build, about" in stdout and "last builds of 1 of them" in stdout  # the train node; its submit was never built here
    assert "; 1 cached (built in " in stdout
    work = tmp_path / "work"  # a copy, so the sweep's three runs stay three for the other tests
    shutil.copytree(swept, work)
    code, stdout, stderr = run_cli(["run", *args, "--work", work, "--out", tmp_path / "sub.csv"], capsys)
    assert code == 0, stderr
    assert any(line.startswith("plan ") and "dense: " in line and "about" in line for line in stdout.splitlines())
    code, stdout, _ = run_cli(["run", *args, "--work", work, "--out", tmp_path / "sub.csv"], capsys)
    assert code == 0 and not any(line.startswith("plan ") for line in stdout.splitlines())  # nothing left to build, nothing said
    # After the run, dag is where its time went: every node's own build seconds, and their sum.
    code, stdout, _ = run_cli(["dag", *args, "--work", work, "--format", "csv"], capsys)
    built = pd.read_csv(io.StringIO(stdout)).set_index("key").built_s
    for key, seconds in built.items():
        (manifest,) = work.glob(f"*/*-{key}/manifest.json")
        assert seconds == round(json.loads(manifest.read_text())["seconds"], 1)
    code, stdout, _ = run_cli(["dag", *args, "--work", work], capsys)
    assert "3 nodes, all cached (built in " in stdout


def test_diff_pairs_two_runs_image_by_image_and_says_whether_the_difference_is_beyond_noise(swept, capsys):
    slow, fast = _by_lr(swept, 1e-4), _by_lr(swept, 1e-3)
    key_a, key_b = slow.name.rsplit("-", 1)[1], fast.name.rsplit("-", 1)[1]
    code, stdout, stderr = run_cli(["diff", key_a[:6], key_b, "--work", swept, "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout)).set_index("scope")
    every = rows.loc["all"]
    summary = {a: json.loads((a / "summary.json").read_text())["valid_logloss"] for a in (slow, fast)}
    # The paired mean is the plain difference of the two runs' scores, on the same images.
    assert every.logloss_a == pytest.approx(summary[slow], abs=1e-4) and every.logloss_b == pytest.approx(summary[fast], abs=1e-4)
    assert every.difference == pytest.approx(every.logloss_b - every.logloss_a, abs=2e-4)
    assert every.low <= every.difference <= every.high and every.b_better + every.b_worse <= every.images
    validated = pd.read_csv(slow / "oof.csv").dropna()  # a hold-out split predicts only its validation rows
    assert every.images == len(validated) and 0 < len(validated) < len(pd.read_csv(slow / "oof.csv"))
    assert rows.drop(index="all").images.sum() == every.images  # each image in its class's row once
    expected = "B better" if every.high < 0 else "A better" if every.low > 0 else "within noise"
    assert every.verdict == expected
    # For people: both runs named, the setting that differs, the verdict in the title.
    code, stdout, _ = run_cli(["diff", slow, fast.name, "--work", swept], capsys)
    assert code == 0 and slow.name in stdout and fast.name in stdout and "train.phases" in stdout and expected in stdout
    # A run against itself: no difference at all, and nothing to choose.
    code, stdout, _ = run_cli(["diff", key_a, key_a, "--work", swept, "--format", "json"], capsys)
    same = json.loads(stdout)[0]
    assert code == 0 and same["difference"] == "+0.0000" and same["low"] == same["high"] == "+0.0000"
    assert same["b_better"] == same["b_worse"] == 0 and same["verdict"] == "within noise"


def test_diff_compares_test_predictions_where_the_data_has_the_answers(swept, tiny_data, tmp_path, capsys):
    from fishcomp.data.images import read_size
    from fishcomp.data.layout import load_dataset
    from fishcomp.metrics import log_loss

    slow, fast = _by_lr(swept, 1e-4), _by_lr(swept, 1e-3)
    truth = pd.read_csv(tiny_data / "solution.csv").set_index("image")
    code, stdout, stderr = run_cli(["diff", slow, fast, "--work", swept, "--split", "test_stg1", "--data", tiny_data, "--format", "csv"], capsys)
    assert code == 0, stderr
    every = pd.read_csv(io.StringIO(stdout)).set_index("scope").loc["all"]
    for folder, column in ((slow, "logloss_a"), (fast, "logloss_b")):
        predicted = pd.read_csv(folder / "test_stg1.csv").set_index("image")
        expected = log_loss(truth.loc[predicted.index].to_numpy().argmax(axis=1), predicted[truth.columns].to_numpy())
        assert every[column] == pytest.approx(expected, abs=1e-4)
    assert every.images == len(pd.read_csv(slow / "test_stg1.csv"))
    # The same predictions as submission files (a run's test_stg1.csv is one): the same table.
    code, stdout, stderr = run_cli(["diff", slow / "test_stg1.csv", fast / "test_stg1.csv", "--data", tiny_data, "--format", "csv"], capsys)
    assert code == 0, stderr
    assert pd.read_csv(io.StringIO(stdout)).set_index("scope").loc["all"].equals(every)
    code, stdout, stderr = run_cli(["diff", slow / "test_stg1.csv", fast / "test_stg1.csv", "--data", tiny_data, "--by", "boat"], capsys)
    assert code == 0 and "boats resampled" in stdout, stderr  # stage 1's photos come from the training boats
    # Whole boats resampled (images of one size): the same difference, an interval over the boats.
    validated = pd.read_csv(slow / "oof.csv").dropna().image
    paths = load_dataset(tiny_data).images.set_index("image").path
    boats = len({read_size(tiny_data / paths[image]) for image in validated})
    assert boats >= 5  # the fixture's seed: 7 boats among the 24 validation images
    code, stdout, stderr = run_cli(["diff", slow, fast, "--work", swept, "--data", tiny_data, "--by", "boat", "--format", "csv"], capsys)
    assert code == 0, stderr
    by_boat = pd.read_csv(io.StringIO(stdout)).set_index("scope").loc["all"]
    by_image = pd.read_csv(io.StringIO(run_cli(["diff", slow, fast, "--work", swept, "--format", "csv"], capsys)[1])).set_index("scope").loc["all"]
    assert by_boat.difference == by_image.difference and by_boat.images == by_image.images
    code, stdout, _ = run_cli(["diff", slow, fast, "--work", swept, "--data", tiny_data, "--by", "boat"], capsys)
    assert code == 0 and f"{boats} boats resampled" in stdout
    code, _, stderr = run_cli(["diff", slow, fast, "--work", swept, "--split", "test_stg1", "--data", tmp_path], capsys)
    assert code == 2 and "no solution.csv" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(["diff", slow, fast, "--work", swept, "--split", "stage1", "--data", tiny_data], capsys)
    assert code == 2 and "one of valid, test_stg1, test_stg2" in stderr


def test_diff_says_in_one_line_which_run_it_cannot_find(swept, tmp_path, capsys):
    import shutil

    code, _, stderr = run_cli(["diff", "ab", "cdef", "--work", swept], capsys)
    assert code == 2 and "at least 4 characters" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(["diff", "ffffffff", "eeeeeeee", "--work", swept], capsys)
    assert code == 2 and "no run 'ffffffff'" in stderr and "fishcomp runs" in stderr
    work = tmp_path / "work"
    (work / "train").mkdir(parents=True)
    original = _by_lr(swept, 1e-3)
    key = original.name.rsplit("-", 1)[1]
    for twin in ("0000", "1111"):  # two runs whose keys start alike
        shutil.copytree(original, work / "train" / f"dense-{key[:8]}{twin}{key[12:]}")
    code, _, stderr = run_cli(["diff", key[:8], key[:8], "--work", work], capsys)
    assert code == 2 and "names 2 runs" in stderr
    code, _, stderr = run_cli(["diff", str(swept / "precompute"), key[:8] + "0000", "--work", work], capsys)
    assert code == 2 and "no oof.csv" in stderr
    # Another config's run (a blend, say) is compared all the same, its settings are not.
    shutil.copytree(original, work / "train" / f"other-{key}")
    code, stdout, stderr = run_cli(["diff", key[:8] + "0000", f"other-{key}", "--work", work], capsys)
    assert code == 0 and "different configs" in stdout and "+0.0000" in stdout, stderr


def test_predict_classifies_photos_as_the_run_predicted_its_own_test_images(swept, tiny_data, tmp_path, capsys):
    sample = pd.read_csv(tiny_data / "sample_submission_stg1.csv").image.head(6).tolist()
    out = tmp_path / "predicted.csv"
    args = ["predict", "-c", CONFIGS / "dense.yaml", *[tiny_data / "test_stg1" / name for name in sample],
            "--data", tiny_data, "--work", swept, "--out", out, *_sets([*QUICK, "train.phases.0.lr=1e-3"])]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert "built" not in stdout  # the trained run and its features came from the cache
    predicted = pd.read_csv(out)
    assert len(predicted) == 6 and np.allclose(predicted.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-5)
    artifact = next(a for a in (swept / "train").glob("dense-*")
                    if yaml.safe_load((a / "config.yaml").read_text())["train"]["phases"][0]["lr"] == 1e-3)
    expected = pd.read_csv(artifact / "test_stg1.csv").set_index("image").loc[sample]
    # Same pass, same heads; the features are rounded to float16 in both, and the backbone's
    # batches differ in size, which can move a feature by one float16 step (about 1e-3 relative).
    np.testing.assert_allclose(predicted.iloc[:, 1:].to_numpy(), expected.to_numpy(), atol=5e-3)
    # The Python API: the same table, as a DataFrame (the CSV holds six decimals).
    import fishcomp

    table = fishcomp.predict(CONFIGS / "dense.yaml", [tiny_data / "test_stg1" / name for name in sample], data=tiny_data, work=swept,
                             overrides=[*QUICK, "train.phases.0.lr=1e-3"])
    assert table.image.tolist() == pd.read_csv(out).image.tolist()
    np.testing.assert_allclose(table.iloc[:, 1:].to_numpy(), predicted.iloc[:, 1:].to_numpy(), atol=1e-6)
    # Without --out: a table of the photos, their predicted class and probabilities.
    folder_args = ["predict", "-c", CONFIGS / "dense.yaml", "--folder", tiny_data / "test_stg1", "--data", tiny_data, "--work", swept,
                   *_sets([*QUICK, "train.phases.0.lr=1e-3"])]
    code, stdout, stderr = run_cli(folder_args, capsys)
    assert code == 0, stderr
    shown = [line for line in stdout.splitlines() if ".jpg" in line]
    assert len(shown) == len(list((tiny_data / "test_stg1").glob("*.jpg")))
    first = predicted.iloc[0]
    row = next(line for line in shown if sample[0] in line)
    assert first.index[1:][int(first.iloc[1:].to_numpy(dtype=float).argmax())] in row
    code, _, stderr = run_cli(["predict", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", swept], capsys)
    assert code == 2 and "nothing to predict" in stderr


def test_cache_ls_du_and_gc_keep_only_what_the_named_configs_reach(swept, tiny_data, tmp_path, capsys):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(swept, work)
    # What lives in the work folder but is not the cache's: `--track`'s default MLflow store and
    # `fishcomp lb`'s scores. Neither is listed, and gc leaves both alone.
    (work / "mlruns" / "0" / "a1b2").mkdir(parents=True)
    (work / "mlruns" / "0" / "meta.yaml").write_text("name: fishcomp\n")
    (work / "leaderboard.csv").write_text("key,name,public,private,recorded,source,note\n")
    code, stdout, _ = run_cli(["cache", "ls", "--work", work, "--format", "csv"], capsys)
    listed = pd.read_csv(io.StringIO(stdout))
    assert code == 0 and set(listed.stage) == {"precompute", "train"} and (listed.status == "whole").all()
    code, stdout, _ = run_cli(["cache", "du", "--work", work], capsys)
    assert code == 0 and "total" in stdout
    keep = ["cache", "gc", "--keep", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", work, *_sets([*QUICK, "train.phases.0.lr=1e-3"])]
    code, stdout, _ = run_cli([*keep, "--dry-run"], capsys)
    assert code == 0 and "would remove 2 artifact(s)" in stdout  # the two other learning rates
    assert len(list((work / "train").glob("dense-*"))) == 3
    # Stopped builds: one of a kept config not built yet (linear's), which the next run resumes,
    # and one of nothing kept.
    from fishcomp.config import load_config
    from fishcomp.context import Context
    from fishcomp.pipeline import resolver

    overrides = [*QUICK, "train.phases.0.lr=1e-3"]
    linear = resolver(Context(data_dir=tiny_data, work_dir=work, overrides=overrides)).plan("train", load_config(CONFIGS / "linear.yaml", overrides))
    for stopped in (work / "train" / f".resume-linear-{linear.key}", work / "train" / ".resume-dense-0123456789abcdef"):
        stopped.mkdir()
        (stopped / "fold0.pt").write_bytes(b"a finished fold")
    code, stdout, _ = run_cli(["cache", "ls", "--work", work, "--format", "csv"], capsys)
    assert (pd.read_csv(io.StringIO(stdout)).status == "resumable").sum() == 2
    code, stdout, _ = run_cli([*keep, "--keep", CONFIGS / "linear.yaml"], capsys)
    assert code == 0 and "removed" in stdout
    assert len(list((work / "train").glob("dense-*"))) == 1 and len(list((work / "precompute").glob("eff*"))) == 1
    assert [p.name for p in (work / "train").glob(".resume-*")] == [f".resume-linear-{linear.key}"]
    assert (work / "mlruns" / "0" / "meta.yaml").is_file() and (work / "mlruns" / "0" / "a1b2").is_dir() and (work / "leaderboard.csv").is_file()


def test_config_prints_the_resolved_yaml(capsys):
    code, stdout, _ = run_cli(["config", "-c", CONFIGS / "dense_360x640.yaml", "--set", "head.dropout=0.3"], capsys)
    assert code == 0
    resolved = yaml.safe_load(stdout)
    assert resolved["name"] == "dense_360x640" and resolved["precompute"]["size"] == [360, 640]
    assert resolved["head"]["dropout"] == 0.3 and resolved["train"]["schedule"] == "constant"  # a default, made visible


def test_version_and_help(capsys):
    code, stdout, _ = run_cli(["--version"], capsys)
    assert code == 0 and stdout.strip() == f"fishcomp {__version__}"
    code, stdout, _ = run_cli(["run", "--help"], capsys)
    assert code == 0 and "--nproc" in stdout and "--debug" in stdout and "--kaggle" in stdout
    code, stdout, _ = run_cli(["--help"], capsys)
    assert stdout.index(" run ") < stdout.index(" synth ")  # run comes first
    code, _, stderr = run_cli(["report", "-x"], capsys)
    assert code == 2 and stderr.startswith("error: No such option: -x") and len(stderr.strip().splitlines()) == 1


def test_tracking_logs_a_run_that_mlflows_own_client_reads_back(tiny_data, tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", work, "--track", *_sets(QUICK)], capsys)
    assert code == 0, stderr
    client = MlflowClient((work / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("fishcomp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    summary = json.loads(next((work / "train").glob("dense-*/summary.json")).read_text())
    assert run.data.tags["fishcomp.stage"] == "train" and run.data.tags["fishcomp.key"] in run.data.tags["fishcomp.artifact"]
    from fishcomp.context import describe_machine

    assert run.data.tags["fishcomp.machine"] == describe_machine()
    assert run.data.params["head.kind"] == "dense" and run.data.params["train.batch_size"] == "32"
    assert run.data.metrics["valid_logloss"] == pytest.approx(summary["valid_logloss"])
    history = client.get_metric_history(run.info.run_id, "fold0.valid_logloss")
    assert [h.step for h in history] == [1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "metrics.csv", "config.yaml"}
    # Tracking changes no artifact: the same command without it finds everything cached.
    code, stdout, _ = run_cli(["train", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", work, *_sets(QUICK)], capsys)
    assert code == 0 and "built" not in stdout


def test_the_python_api_returns_the_artifacts_the_cli_made(swept, tiny_data):
    import fishcomp

    overrides = [*QUICK, "train.phases.0.lr=1e-3"]
    trained = fishcomp.train(CONFIGS / "dense.yaml", data=tiny_data, work=swept, overrides=overrides)
    assert not trained.built and trained.file("oof.csv").is_file()  # the sweep's run, from the cache
    rows = fishcomp.dag(CONFIGS / "dense.yaml", data=tiny_data, work=swept, overrides=overrides)
    assert [(r.node.stage.name, r.status) for r in rows] == [("precompute", "cached"), ("train", "cached"), ("submit", "to build")]
    submitted = fishcomp.run(CONFIGS / "dense.yaml", data=tiny_data, work=swept, overrides=overrides)
    assert submitted.stage == "submit" and submitted.built
    # The between-runs tables as DataFrames, the same numbers as the CLI's.
    table = fishcomp.runs(work=swept, solution=tiny_data / "solution.csv")
    trains = table[table.stage == "train"].sort_values("valid_logloss")
    assert len(trains) >= 3 and trains.vs_best.iloc[0] == "best" and trains.test_stg1.notna().all()
    slow, fast = _by_lr(swept, 1e-4), _by_lr(swept, 1e-3)
    paired = fishcomp.diff(slow.name.rsplit("-", 1)[1], fast, work=swept)
    scores = [json.loads((run / "summary.json").read_text())["valid_logloss"] for run in (slow, fast)]
    assert paired.loc["all", "logloss_a"] == pytest.approx(scores[0]) and paired.loc["all", "logloss_b"] == pytest.approx(scores[1])
    assert paired.loc["all", "low"] <= paired.loc["all", "difference"] <= paired.loc["all", "high"]
    assert set(paired.verdict) <= {"B better", "A better", "within noise"}


def test_predict_with_a_calibrated_heads_config_applies_the_runs_calibration(swept, tiny_data, tmp_path, capsys):
    """A head's config with a calibrate section predicts what its calibrated run wrote, not the
    fold models' raw mean."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(swept, work)  # the sweep's folder stays as the other tests count it
    settings = _sets([*QUICK, "train.phases.0.lr=1e-3", "calibrate={}"])
    code, stdout, stderr = run_cli(["run", "-c", CONFIGS / "dense.yaml", "--stage", "calibrate", "--data", tiny_data, "--work", work, *settings], capsys)
    assert code == 0, stderr
    (calibrated,) = [p for p in (work / "calibrate").iterdir() if not p.name.startswith(".")]
    written = pd.read_csv(calibrated / "test_stg1.csv").set_index("image")
    raw = pd.read_csv(next(a for a in (work / "train").glob("dense-*")
                           if yaml.safe_load((a / "config.yaml").read_text())["train"]["phases"][0]["lr"] == 1e-3) / "test_stg1.csv").set_index("image")
    sample = written.index[:4].tolist()
    out = tmp_path / "predicted.csv"
    code, _, stderr = run_cli(["predict", "-c", CONFIGS / "dense.yaml", *[tiny_data / "test_stg1" / name for name in sample],
                               "--data", tiny_data, "--work", work, "--out", out, *settings], capsys)
    assert code == 0, stderr
    predicted = pd.read_csv(out)[written.columns].to_numpy()
    assert np.abs(written.loc[sample].to_numpy() - raw.loc[sample].to_numpy()).max() > 0.02  # so the check can tell them apart
    # The same features to one float16 step (other batches), as the direct path's test above.
    np.testing.assert_allclose(predicted, written.loc[sample].to_numpy(), atol=5e-3)


def test_predict_with_a_blend_or_a_fine_tuned_head_not_run_here_says_to_run_it_first(tiny_data, tmp_path, capsys):
    """A blend's or a crops head's prediction takes every fold model (and the calibration) from its
    finished run; where there is none, or none can be taken (a fine-tuned head trains again for new
    photos), one line says so and nothing is built or left behind."""
    photo = tiny_data / "test_stg1" / sorted(p.name for p in (tiny_data / "test_stg1").iterdir())[0]
    work = tmp_path / "work"
    for config, said in (("pipeline.yaml", "its calibration is not built"), ("crops.yaml", "stages have none (precompute"),
                         ("finetune.yaml", "train [finetune])")):
        code, _, stderr = run_cli(["predict", "-c", CONFIGS / config, photo, "--data", tiny_data, "--work", work, *_sets(TINY)], capsys)
        assert code == 2 and said in stderr and "run `fishcomp run -c" in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not work.exists() or not any(work.rglob("*.*"))  # nothing built, no prediction folder left
