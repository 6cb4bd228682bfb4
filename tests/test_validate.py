import numpy as np
import pandas as pd
import pytest

from fishcomp.data.layout import FISHERIES_CLASSES
from fishcomp.errors import FishcompError
from fishcomp.stages.validate import score_submission, validate_submission

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
        assert validate_submission(path, root) == {"stage": stage, "rows": len(rows)}


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
