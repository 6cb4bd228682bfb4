"""`fishcomp diff` on two submission files and a solution (the competition's released answers, or
synthetic data's solution.csv): paired image by image, per stage and per class, through the CLI."""

import io

import numpy as np
import pandas as pd
import pytest
from helpers import run_cli

from fishcomp.data.layout import FISHERIES_CLASSES

STAGE1 = [f"img_{i:05d}.jpg" for i in range(1, 41)]
STAGE2 = [f"test_stg2/image_{i:05d}.jpg" for i in range(1, 21)]
ROWS = STAGE1 + STAGE2


def _write(path, rows, probs, columns=FISHERIES_CLASSES):
    frame = pd.DataFrame(probs, columns=FISHERIES_CLASSES)[list(columns)]
    frame.insert(0, "image", rows)
    frame.to_csv(path, index=False)
    return path


@pytest.fixture()
def files(tmp_path):
    """A solution, a submission that puts 0.3 on every right answer and one that puts 0.6 on the
    stage-1 answers and 0.3 on the stage-2 ones: B better on stage 1 by exactly log 2, level on stage 2."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=len(ROWS))
    truth = np.eye(8)[labels]
    solution = _write(tmp_path / "solution.csv", ROWS, truth)

    def confident(on_answer):
        probs = np.full((len(ROWS), 8), 0.0)
        probs[:] = ((1 - on_answer) / 7)[:, None]
        probs[np.arange(len(ROWS)), labels] = on_answer
        return probs

    a = _write(tmp_path / "a.csv", ROWS, confident(np.full(len(ROWS), 0.3)))
    b_answer = np.where(np.arange(len(ROWS)) < len(STAGE1), 0.6, 0.3)
    b = _write(tmp_path / "b.csv", ROWS, confident(b_answer), columns=FISHERIES_CLASSES[::-1])  # another column order
    return {"solution": solution, "a": a, "b": b, "labels": labels, "tmp": tmp_path}


def _table(stdout):
    return pd.read_csv(io.StringIO(stdout)).set_index("scope")


def test_two_submissions_are_paired_on_the_answers_per_stage_and_per_class(files, capsys):
    code, stdout, stderr = run_cli(["diff", files["a"], files["b"], "--solution", files["solution"], "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = _table(stdout)
    share = len(STAGE1) / len(ROWS)
    assert rows.loc["all", "images"] == len(ROWS)
    assert rows.loc["all", "logloss_a"] == pytest.approx(-np.log(0.3), abs=1e-4)
    assert rows.loc["all", "difference"] == pytest.approx(-np.log(2) * share, abs=1e-4)
    assert rows.loc["test_stg1", "difference"] == pytest.approx(-np.log(2), abs=1e-4)
    # A constant difference has no spread: its interval is the point itself.
    assert rows.loc["test_stg1", "low"] == rows.loc["test_stg1", "high"] == rows.loc["test_stg1", "difference"]
    assert rows.loc["test_stg1", "verdict"] == "B better" and rows.loc["test_stg1", "b_better"] == len(STAGE1)
    assert rows.loc["test_stg2", "difference"] == 0 and rows.loc["test_stg2", "verdict"] == "within noise"
    assert rows.loc["test_stg2", "b_better"] == rows.loc["test_stg2", "b_worse"] == 0
    assert rows.loc["all", "low"] < rows.loc["all", "difference"] < rows.loc["all", "high"] < 0
    present = {FISHERIES_CLASSES[i] for i in files["labels"]}
    assert present <= set(rows.index) and rows.loc[sorted(present), "images"].sum() == len(ROWS)
    # One stage's rows only; and the table for people names the answers and the verdict.
    code, stdout, stderr = run_cli(["diff", files["a"], files["b"], "--solution", files["solution"], "--split", "test_stg2", "--format", "csv"], capsys)
    assert code == 0, stderr
    only = _table(stdout)
    assert only.loc["all", "images"] == len(STAGE2) and "test_stg1" not in only.index and only.loc["all", "difference"] == 0
    code, stdout, _ = run_cli(["diff", files["a"], files["b"], "--solution", files["solution"]], capsys)
    assert code == 0 and "on solution.csv" in stdout and "B better" in stdout


def test_the_solution_is_read_from_the_data_folder_and_validate_scores_the_same(files, capsys):
    """Without --solution, DATA/solution.csv; each side's log loss is the one `validate` would print."""
    from fishcomp.submission import read_submission, score_submission

    code, stdout, stderr = run_cli(["diff", files["a"], files["b"], "--data", files["tmp"], "--format", "csv"], capsys)
    assert code == 0, stderr
    every = _table(stdout).loc["all"]
    assert every.logloss_a == pytest.approx(score_submission(read_submission(files["a"]), files["solution"]), abs=1e-4)
    assert every.logloss_b == pytest.approx(score_submission(read_submission(files["b"]), files["solution"]), abs=1e-4)


def test_a_released_solutions_extra_columns_and_unscored_rows_are_left_out_and_counted(files, capsys):
    """Kaggle's solutions carry a `Usage` column, and may hold rows the competition does not score
    (no 1 in them): neither is read as a class or an answer."""
    truth = pd.read_csv(files["solution"])
    truth.loc[:4, FISHERIES_CLASSES] = 0
    truth["Usage"] = "Public"
    released = files["tmp"] / "released.csv"
    truth.to_csv(released, index=False)
    code, stdout, stderr = run_cli(["diff", files["a"], files["b"], "--solution", released], capsys)
    assert code == 0, stderr
    assert "5 row(s) without a 1" in stderr and "left out: 5 of a.csv, 5 of b.csv" in stdout
    code, stdout, _ = run_cli(["diff", files["a"], files["b"], "--solution", released, "--format", "csv"], capsys)
    rows = _table(stdout)
    assert rows.loc["all", "images"] == len(ROWS) - 5 and rows.loc["all", "logloss_a"] == pytest.approx(-np.log(0.3), abs=1e-4)
    assert rows.loc["test_stg1", "images"] == len(STAGE1) - 5 and "Usage" not in rows.index


@pytest.mark.parametrize(
    "case, expected",
    [
        ("run_and_file", "is a file and the other is not"),
        ("no_solution", "no solution"),
        ("other_classes", "are not the other submission's"),
        ("not_numbers", "non-numeric probabilities"),
        ("two_ones", "not one 1 and zeros"),
        ("no_answer", "has an answer"),
        ("split_valid", "submissions hold test rows only"),
        ("not_a_submission", "not a submission"),
        ("no_such_file", "submission not found"),
    ],
)
def test_submissions_that_cannot_be_compared_get_one_line(files, capsys, case, expected):
    a, b, solution, tmp = files["a"], files["b"], files["solution"], files["tmp"]
    args = ["diff", a, b, "--solution", solution]
    if case == "run_and_file":
        args = ["diff", a, "abcd1234", "--solution", solution]
    elif case == "no_solution":
        args = ["diff", a, b, "--data", tmp / "nowhere"]
    elif case == "other_classes":
        pd.read_csv(b).rename(columns={"ALB": "TUNA"}).to_csv(tmp / "c.csv", index=False)
        args = ["diff", a, tmp / "c.csv", "--solution", solution]
    elif case == "not_numbers":
        pd.read_csv(b).astype({"ALB": object}).assign(ALB="high").to_csv(tmp / "c.csv", index=False)
        args = ["diff", a, tmp / "c.csv", "--solution", solution]
    elif case == "two_ones":
        pd.read_csv(solution).assign(ALB=1, BET=1).to_csv(tmp / "s.csv", index=False)
        args = ["diff", a, b, "--solution", tmp / "s.csv"]
    elif case == "no_answer":
        pd.read_csv(solution).assign(image=lambda f: "other_" + f.image).to_csv(tmp / "s.csv", index=False)
        args = ["diff", a, b, "--solution", tmp / "s.csv"]
    elif case == "split_valid":
        args += ["--split", "valid"]
    elif case == "no_such_file":
        args = ["diff", a, tmp / "typo.csv", "--solution", solution]
    elif case == "not_a_submission":
        pd.read_csv(b).rename(columns={"image": "file"}).to_csv(tmp / "c.csv", index=False)
        args = ["diff", tmp / "c.csv", b, "--solution", solution]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 2 and expected in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_several_submissions_against_one_get_a_row_each(files, capsys):
    code, stdout, stderr = run_cli(["diff", files["a"], files["b"], files["a"], "--solution", files["solution"], "--format", "csv"], capsys)
    assert code == 0, stderr
    rows = pd.read_csv(io.StringIO(stdout))
    assert list(rows.b) == [str(files["b"]), str(files["a"])] and list(rows.images) == [len(ROWS)] * 2
    assert rows.difference[0] == pytest.approx(-np.log(2) * len(STAGE1) / len(ROWS), abs=1e-4) and rows.verdict[0] == "B better"
    assert rows.difference[1] == 0 and rows.b_better[1] == rows.b_worse[1] == 0  # A against itself
