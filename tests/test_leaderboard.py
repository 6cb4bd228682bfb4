"""`fishcomp lb`: leaderboard scores recorded against the submissions that earned them, through
the real CLI on three real submissions (one linear probe, three clips)."""

import gzip
import io
import json
import shutil

import pandas as pd
import pytest
from helpers import CONFIGS, SMALL, run_cli
from scipy.stats import spearmanr

import fishcomp

EPS = ("0.005", "0.02", "0.05")


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def submissions(tiny_data, tmp_path_factory):
    """Three submissions of the linear probe, clipped three ways (`submission-1.csv` ...), and each
    submit artifact's key and clipped out-of-fold log loss, in that order."""
    from fishcomp.cli import main

    root = tmp_path_factory.mktemp("lb")
    work, out = root / "work", root / "submission.csv"
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in ["run", "-c", CONFIGS / "linear.yaml", "--data", tiny_data, "--work", work, "--out", out,
                               *_sets([*SMALL, "submit.clip.eps=" + ",".join(EPS)])]])
    assert done.value.code == 0
    built = {}
    for folder in (work / "submit").glob("linear-*"):
        summary = json.loads((folder / "summary.json").read_text())
        built[summary["clip_resolved"]["eps"]] = (folder.name.rsplit("-", 1)[1], summary["oof_logloss_clipped"])
    assert len(built) == 3
    return work, root, [built[float(eps)] for eps in EPS]


def _ledger_table(stdout: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(stdout[stdout.index("name,key"):]), dtype={"key": str})


def test_a_score_is_matched_to_its_submission_by_content_or_key_and_set_beside_its_out_of_fold_estimate(submissions, tmp_path, capsys, tiny_data):
    work, root, built = submissions
    work = shutil.copytree(work, tmp_path / "work")
    # Renamed and gzipped as it was uploaded: found by what it holds.
    uploaded = tmp_path / "my best.csv.gz"
    uploaded.write_bytes(gzip.compress((root / "submission-1_stg2.csv").read_bytes()))
    publics = [valid + 0.05 for _, valid in built]  # the leaderboard ranks them as the folds do
    code, stdout, stderr = run_cli(["lb", uploaded, f"{publics[0]}", "--work", work, "--format", "csv"], capsys)
    assert code == 0, stderr
    assert f"recorded linear-{built[0][0]}: public {publics[0]}" in stdout
    assert run_cli(["lb", f"linear-{built[1][0][:6]}", f"{publics[1]}", "--private", "0.9", "--work", work], capsys)[0] == 0
    code, stdout, stderr = run_cli(["lb", root / "submission-3.csv", f"{publics[2]}", "--note", "stage 1 file", "--work", work, "--format", "csv"], capsys)
    assert code == 0, stderr
    table = _ledger_table(stdout).set_index("key")
    for (key, valid), public in zip(built, publics):
        assert table.loc[key, "valid_logloss"] == pytest.approx(valid, abs=1e-4)
        assert table.loc[key, "public"] == pytest.approx(public, abs=1e-4)
        assert table.loc[key, "public_minus_valid"] == pytest.approx(0.05, abs=2e-4)  # the cells hold 4 decimals
    assert table.loc[built[1][0], "private"] == 0.9 and table.loc[built[2][0], "note"] == "stage 1 file"
    code, stdout, _ = run_cli(["lb", "--work", work], capsys)
    said = " ".join(stdout.split())  # however the console wraps it
    assert "3 scored submissions: Spearman rank correlation of out-of-fold and public log loss +1.00 (the folds rank runs as the leaderboard does)" in said

    # And drawn: `report` plots each submission's public score against its out-of-fold estimate.
    trained = next((work / "train").glob("linear-*"))
    code, _, stderr = run_cli(["report", trained, "--data", tiny_data, "--work", work, "--out", tmp_path / "report"], capsys)
    assert code == 0, stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "leaderboard (3 scored submissions)" in page and "Spearman rank correlation of out-of-fold and public log loss +1.00" in page
    assert (tmp_path / "report" / "leaderboard.png").stat().st_size > 5000  # a drawn figure, not an empty canvas

    # The same table for a notebook.
    frame = fishcomp.leaderboard(work)
    assert frame.set_index("key").public.to_dict() == pytest.approx(dict(zip([key for key, _ in built], publics)))

    # Rescored (a mistyped number): the newest record wins, in `lb` and in `runs`. The folds' best
    # submission gets the worst public score, so the two rankings disagree from here on.
    best = min(range(len(built)), key=lambda i: built[i][1])
    rescored = [round(max(publics) + 0.5, 4) if i == best else public for i, public in enumerate(publics)]
    assert run_cli(["lb", built[best][0], f"{rescored[best]}", "--work", work], capsys)[0] == 0
    code, stdout, _ = run_cli(["runs", "--work", work, "--format", "csv", "--sort", "public_lb"], capsys)
    runs = pd.read_csv(io.StringIO(stdout), dtype={"key": str})
    scored = runs[runs.public_lb.notna()]
    order = sorted(range(len(built)), key=lambda i: rescored[i])  # lowest (best) public first
    assert set(scored.stage) == {"submit"} and list(scored.key) == [built[i][0] for i in order]
    assert scored.public_lb.tolist() == pytest.approx([rescored[i] for i in order], abs=1e-4)
    assert runs.loc[runs.key == built[1][0], "private_lb"].item() == 0.9
    # The three submissions differ in their clip alone, and the table says so; one built before
    # submit artifacts kept their config compares with nothing rather than differing in everything.
    assert sorted(scored.differs) == [f"submit.clip.eps={eps}" for eps in EPS]
    older = next(work.glob(f"submit/linear-{built[2][0]}"))
    (older / "config.yaml").unlink()
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["files"]["config.yaml"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    runs = pd.read_csv(io.StringIO(run_cli(["runs", "--work", work, "--format", "csv"], capsys)[1]), dtype={"key": str}, keep_default_na=False).set_index("key")
    assert [runs.loc[key, "differs"] for key, _ in built] == [f"submit.clip.eps={EPS[0]}", f"submit.clip.eps={EPS[1]}", ""]
    code, stdout, _ = run_cli(["lb", "--work", work], capsys)
    rho = spearmanr([valid for _, valid in built], rescored).statistic
    assert rho < 0.7  # the folds' first is the leaderboard's last: -0.5 for three
    assert f"log loss {rho:+.2f} (the folds" in " ".join(stdout.split())


@pytest.mark.parametrize("case", ["another file", "no score", "not a number", "a missing file", "both"])
def test_a_bad_record_is_one_line_and_leaves_the_ledger_as_it_was(case, submissions, tmp_path, capsys):
    work, root, built = submissions
    work = shutil.copytree(work, tmp_path / "work")
    assert run_cli(["lb", built[0][0], "0.5", "--work", work], capsys)[0] == 0
    before = (work / "leaderboard.csv").read_bytes()
    stranger = tmp_path / "other.csv"
    stranger.write_text("image,ALB\nimg_1.jpg,1\n")
    args, said = {
        "another file": ([stranger, "0.5"], "is not a submission in"),
        "no score": ([root / "submission-1.csv"], "give the score Kaggle gave it"),
        "not a number": ([root / "submission-1.csv", "inf"], "a log loss is a finite number"),
        "a missing file": ([tmp_path / "gone.csv", "0.5"], "submission not found"),
        "both": ([built[0][0], "0.5", "--pull"], "not both"),
    }[case]
    code, _, stderr = run_cli(["lb", *args, "--work", work], capsys)
    assert code == 2 and said in stderr and len(stderr.strip().splitlines()) == 1
    assert (work / "leaderboard.csv").read_bytes() == before


def test_pull_reads_back_the_scores_of_uploads_made_with_kaggle(submissions, tmp_path, capsys, monkeypatch, tiny_data):
    work, root, built = submissions
    work = shutil.copytree(work, tmp_path / "work")
    calls = tmp_path / "calls.txt"
    listing = tmp_path / "listing.csv"
    fake = tmp_path / "bin" / "kaggle"
    fake.parent.mkdir()
    # The official CLI's two commands: `submit` says it worked; `submissions` prints the listing,
    # after the notice older versions print first.
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nif [ "$2" = submissions ]; then echo "Warning: a newer version"; cat {listing}; '
                    'else echo "Successfully submitted"; fi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    submit = ["submit", "-c", CONFIGS / "linear.yaml", "--data", tiny_data, "--work", work, "--out", tmp_path / "s.csv", *_sets(SMALL)]
    assert run_cli([*submit, *_sets(["submit.clip.eps=0.005"]), "--kaggle"], capsys)[0] == 0  # message: fishcomp linear KEY
    assert run_cli([*submit, *_sets(["submit.clip.eps=0.02"]), "--kaggle", "-m", "first try"], capsys)[0] == 0
    code, stdout, _ = run_cli(["lb", "--work", work, "--format", "csv"], capsys)
    pending = _ledger_table(stdout)
    assert set(pending.key) == {built[0][0], built[1][0]} and set(pending.source) == {"pending"}

    listing.write_text(
        "fileName,date,description,status,publicScore,privateScore\n"
        f"s_stg2.csv,2026-12-06 10:00:00,fishcomp linear {built[0][0]},SubmissionStatus.COMPLETE,0.71234,0.73\n"
        "s_stg2.csv,2026-12-06 10:05:00,first try,SubmissionStatus.COMPLETE,0.69,\n"
        "theirs.csv,2026-12-06 11:00:00,a public kernel,SubmissionStatus.COMPLETE,0.65,\n"
        f"s_stg2.csv,2026-12-06 12:00:00,fishcomp linear {built[2][0]},SubmissionStatus.PENDING,,\n"
    )
    code, stdout, stderr = run_cli(["lb", "--pull", "--work", work, "--format", "csv"], capsys)
    assert code == 0, stderr
    assert "4 Kaggle submissions to the-nature-conservancy-fisheries-monitoring, 3 of them this cache's (2 new scores, 1 not scored yet)" in stdout
    assert calls.read_text().splitlines()[-1].split() == ["competitions", "submissions", "-c", "the-nature-conservancy-fisheries-monitoring", "--csv"]
    table = _ledger_table(stdout).set_index("key")
    assert table.loc[built[0][0], ["public", "private"]].tolist() == [0.7123, 0.73]
    assert table.loc[built[1][0], "public"] == 0.69 and table.loc[built[1][0], "source"] == "kaggle"
    assert built[2][0] not in table.index  # not scored yet, and never uploaded through fishcomp here
    rows = len(pd.read_csv(work / "leaderboard.csv"))
    code, stdout, _ = run_cli(["lb", "--pull", "--work", work], capsys)
    assert "(0 new scores, 1 not scored yet)" in stdout and len(pd.read_csv(work / "leaderboard.csv")) == rows

    # An upload that went through is not failed afterwards by a ledger it cannot write to.
    (work / "leaderboard.csv").write_text("not a ledger\n")
    code, _, stderr = run_cli([*submit, *_sets(["submit.clip.eps=0.05"]), "--kaggle"], capsys)
    assert code == 0 and "uploaded, but not recorded for `fishcomp lb --pull`" in stderr
    assert calls.read_text().splitlines()[-1].split()[:2] == ["competitions", "submit"]

    fake.write_text("#!/bin/sh\necho '403 - Forbidden' >&2\nexit 1\n")
    code, _, stderr = run_cli(["lb", "--pull", "--work", work], capsys)
    assert code == 2 and "kaggle competitions submissions failed: 403 - Forbidden" in stderr


def test_a_damaged_leaderboard_file_is_named_by_lb_and_only_costs_runs_its_columns(submissions, tmp_path, capsys):
    work, _, built = submissions
    work = shutil.copytree(work, tmp_path / "work")
    (work / "leaderboard.csv").write_text(f"key,name,public,private,recorded,source,note\n{built[0][0]},linear,0.6O,,,manual,\n")
    code, _, stderr = run_cli(["lb", "--work", work], capsys)
    assert code == 2 and "leaderboard.csv: a public score is not a number" in stderr and len(stderr.strip().splitlines()) == 1
    (work / "leaderboard.csv").write_text("something else entirely\n1,2\n")
    code, _, stderr = run_cli(["lb", "--work", work], capsys)
    assert code == 2 and "leaderboard.csv lacks the column(s) key, name, public" in stderr and len(stderr.strip().splitlines()) == 1
    code, stdout, stderr = run_cli(["runs", "--work", work, "--format", "csv"], capsys)
    assert code == 0 and "no leaderboard columns" in stderr
    assert "public_lb" not in stdout and all(key in stdout for key, _ in built)


def test_gc_keeps_the_submissions_on_the_leaderboard(submissions, tmp_path, capsys, tiny_data):
    work, _, built = submissions
    work = shutil.copytree(work, tmp_path / "work")
    assert run_cli(["lb", built[1][0], "0.7", "--work", work], capsys)[0] == 0
    # Keep the first clip's graph only: the second submission has a score, the third none.
    keep = ["cache", "gc", "--keep", CONFIGS / "linear.yaml", "--data", tiny_data, "--work", work, *_sets([*SMALL, f"submit.clip.eps={EPS[0]}"])]
    code, stdout, stderr = run_cli(keep, capsys)
    assert code == 0, stderr
    assert "removed 1 artifact(s)" in stdout and "and 1 submission(s) on the leaderboard (fishcomp lb)" in stdout
    left = {folder.name.rsplit("-", 1)[1] for folder in (work / "submit").glob("linear-*")}
    assert left == {built[0][0], built[1][0]}
