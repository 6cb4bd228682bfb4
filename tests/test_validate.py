import numpy as np
import pandas as pd
import pytest
from helpers import run_cli

from fishcomp.data.layout import FISHERIES_CLASSES
from fishcomp.errors import FishcompError
from fishcomp.submission import score_submission, validate_submission

STAGE1 = [f"img_{i:05d}.jpg" for i in range(1, 6)]
STAGE2 = STAGE1 + [f"test_stg2/image_{i:05d}.jpg" for i in range(1, 4)]


@pytest.fixture()
def root(tmp_path):
    for name, rows in [("sample_submission_stg1.csv", STAGE1), ("sample_submission_stg2.csv", STAGE2)]:
        frame = pd.DataFrame(1 / 8, index=rows, columns=FISHERIES_CLASSES)
        frame.index.name = "image"
        frame.reset_index().to_csv(tmp_path / name, index=False)
    return tmp_path


def good(rows):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=len(rows))
    frame = pd.DataFrame(probs, columns=FISHERIES_CLASSES)
    frame.insert(0, "image", rows)
    return frame


def broken(kind):
    frame = good(STAGE1)
    if kind == "reordered header":
        return frame[["image", "BET", "ALB", *FISHERIES_CLASSES[2:]]]
    if kind == "missing column":
        return frame.drop(columns=["YFT"])
    if kind == "missing row":
        return frame.iloc[1:]
    if kind == "extra row":
        return pd.concat([frame, good(["img_99999.jpg"])])
    if kind == "duplicate":
        return pd.concat([frame, frame.iloc[:1]])
    if kind == "nan":
        frame.loc[2, "DOL"] = np.nan
    if kind == "negative":
        frame.loc[2, "DOL"] = -0.1
    if kind == "above one":
        frame.loc[2, "DOL"] = 1.5
    if kind == "text":
        frame["DOL"] = frame["DOL"].astype(object)
        frame.loc[2, "DOL"] = "high"
    if kind == "all zero":
        frame.loc[3, FISHERIES_CLASSES] = 0.0
    if kind == "stage-2 names in stage 1":
        frame.loc[0, "image"] = "test_stg1/" + frame.loc[0, "image"]
    return frame


@pytest.mark.parametrize(
    "kind, message",
    [
        ("reordered header", "header must be image,ALB,BET"),
        ("missing column", "header must be"),
        ("missing row", "1 test image\\(s\\) missing: img_00001.jpg"),
        ("extra row", "1 row\\(s\\) that are not test_stg1 test images: img_99999.jpg"),
        ("duplicate", "duplicate rows: img_00001.jpg"),
        ("nan", "missing or non-numeric"),
        ("text", "missing or non-numeric"),
        ("negative", "outside \\[0, 1\\]"),
        ("above one", "outside \\[0, 1\\]"),
        ("all zero", "all-zero rows"),
        ("stage-2 names in stage 1", "stage-1 rows are bare file names"),
    ],
)
def test_each_broken_submission_gets_one_line(root, tmp_path, kind, message):
    path = tmp_path / "sub.csv"
    broken(kind).to_csv(path, index=False)
    with pytest.raises(FishcompError, match=message) as info:
        validate_submission(path, root)
    assert "\n" not in str(info.value)


def test_good_submissions_pass_for_both_stages(root, tmp_path):
    for rows, stage in [(STAGE1, "test_stg1"), (STAGE2, "test_stg2")]:
        path = tmp_path / f"{stage}.csv"
        good(rows).to_csv(path, index=False)
        assert validate_submission(path, root) == {"stage": stage, "rows": len(rows), "unnormalised_rows": 0}


def test_stage2_must_list_stage1_rows_too(root, tmp_path):
    path = tmp_path / "s2.csv"
    good(STAGE2[5:]).to_csv(path, index=False)
    with pytest.raises(FishcompError, match="5 test image\\(s\\) missing"):
        validate_submission(path, root)


def test_score_uses_the_solution(root, tmp_path):
    solution = pd.DataFrame(0, index=STAGE1, columns=FISHERIES_CLASSES)
    solution["ALB"] = 1
    solution.index.name = "image"
    solution.reset_index().to_csv(tmp_path / "solution.csv", index=False)
    perfect = good(STAGE1)
    perfect[FISHERIES_CLASSES] = 0.0
    perfect["ALB"] = 1.0
    assert score_submission(perfect, tmp_path / "solution.csv") == pytest.approx(0, abs=1e-12)
    assert score_submission(good(STAGE1).assign(**{c: 1 / 8 for c in FISHERIES_CLASSES}), tmp_path / "solution.csv") == pytest.approx(np.log(8))


def test_validate_warns_about_rows_that_do_not_sum_to_one_and_still_accepts_them(root, tmp_path, capsys):
    frame = good(STAGE1)
    frame.loc[1, FISHERIES_CLASSES] = 0.9  # eight values of 0.9: each in [0, 1], the row sums to 7.2
    frame.loc[2, FISHERIES_CLASSES] = frame.loc[2, FISHERIES_CLASSES].round(4)  # rounding is not a problem
    frame.to_csv(tmp_path / "sub.csv", index=False)
    code, stdout, stderr = run_cli(["validate", tmp_path / "sub.csv", "--data", root], capsys)
    assert code == 0 and "valid test_stg1 submission" in stdout
    assert "1 row(s) do not sum to 1 (e.g. img_00002.jpg sums to 7.2)" in stderr and "Kaggle divides each row" in stderr


def test_validate_names_a_missing_data_folder_instead_of_the_header(tmp_path, capsys):
    good(STAGE1).to_csv(tmp_path / "sub.csv", index=False)
    code, _, stderr = run_cli(["validate", tmp_path / "sub.csv", "--data", tmp_path / "nonexistent"], capsys)
    assert code == 2 and stderr.strip() == f"error: data folder not found: {tmp_path / 'nonexistent'} (validate reads the class list and test images from it; pass --data)"
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli(["validate", tmp_path / "sub.csv", "--data", tmp_path / "empty"], capsys)
    assert code == 2 and "no sample submission and no train/ class folders" in stderr


@pytest.mark.parametrize("mx", [0.5, 0.82, 0.95])
def test_every_clip_writes_rows_that_sum_to_one_and_keeps_kaggles_score(mx):
    """Kaggle renormalises each row before scoring, so a clip that renormalises scores the same as
    the lesson's unnormalised one, and what is written is exactly what is scored."""
    from fishcomp.config import ClipConfig
    from fishcomp.metrics import log_loss
    from fishcomp.stages.submit import apply_clip

    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(8, 0.2), size=200)
    labels = rng.integers(0, 8, size=200)
    lesson = np.clip(probs, (1 - mx) / 7, mx)
    for clip in (ClipConfig(kind="do_clip", mx=mx), ClipConfig(kind="eps", eps=0.01), ClipConfig(kind="none")):
        clipped = apply_clip(probs, clip)
        np.testing.assert_allclose(clipped.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert log_loss(labels, apply_clip(probs, ClipConfig(kind="do_clip", mx=mx))) == pytest.approx(log_loss(labels, lesson), rel=1e-12)
    assert not np.allclose(lesson.sum(axis=1), 1.0)  # the lesson's own clip does not renormalise
