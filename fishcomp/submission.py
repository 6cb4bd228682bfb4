"""The submission format: read a CSV, check it the way Kaggle would accept it, score it when answers exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.console import warn
from fishcomp.data.layout import expected_rows, read_classes
from fishcomp.errors import FishcompError
from fishcomp.metrics import log_loss

ROW_SUM_TOLERANCE = 1e-3


def read_submission(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FishcompError(f"submission not found: {path}")
    try:
        return pd.read_csv(path, dtype={"image": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FishcompError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from exc


def _first(items, limit: int = 3) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def validate_submission(path: Path, root: Path) -> dict:
    """Raise FishcompError with a one-line reason, or return {stage, rows}."""
    if not Path(root).is_dir():
        raise FishcompError(f"data folder not found: {root} (validate reads the class list and test images from it; pass --data)")
    frame = read_submission(path)
    classes = read_classes(Path(root))
    if not classes:
        raise FishcompError(f"{root}: no sample submission and no train/ class folders to read the class list from; pass the competition folder as --data")
    header = ["image", *classes]
    if list(frame.columns) != header:
        raise FishcompError(f"{path}: header must be {','.join(header)}, got {','.join(map(str, frame.columns))}")
    names = frame.image.astype(str)
    stage = "test_stg2" if names.str.startswith("test_stg2/").any() else "test_stg1"
    wanted = expected_rows(Path(root), stage)
    if stage == "test_stg1" and names.str.contains("/").any():
        raise FishcompError(f"{path}: stage-1 rows are bare file names, got {_first(names[names.str.contains('/')])}")
    duplicates = names[names.duplicated()]
    if len(duplicates):
        raise FishcompError(f"{path}: duplicate rows: {_first(duplicates.unique())}")
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise FishcompError(f"{path}: {len(missing)} test image(s) missing: {_first(missing)}")
    extra = sorted(set(names) - set(wanted))
    if extra:
        raise FishcompError(f"{path}: {len(extra)} row(s) that are not {stage} test images: {_first(extra)}")
    unnormalised = check_probabilities(frame, classes, path)
    return {"stage": stage, "rows": len(frame), "unnormalised_rows": unnormalised}


def check_probabilities(frame: pd.DataFrame, classes: list[str], path: Path) -> int:
    """Every row's values are probabilities Kaggle can score (numbers in [0, 1], not all zero), or
    a one-line error; rows that do not sum to 1 get a warning. Returns how many do not."""
    names = frame.image.astype(str)
    values = frame[classes].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1)
    if bad.any():
        raise FishcompError(f"{path}: missing or non-numeric probabilities in {bad.sum()} row(s), e.g. {names[bad].iloc[0]}")
    array = values.to_numpy(dtype=np.float64)
    outside = ((array < 0) | (array > 1)).any(axis=1)
    if outside.any():
        raise FishcompError(f"{path}: probabilities outside [0, 1] in {outside.sum()} row(s), e.g. {names[outside].iloc[0]}")
    empty = array.sum(axis=1) <= 0
    if empty.any():
        raise FishcompError(f"{path}: all-zero rows cannot be normalised, e.g. {names[empty].iloc[0]}")
    sums = array.sum(axis=1)
    # Eight values written to 4 decimals are off by at most 4e-4; more than that is not rounding.
    unnormalised = np.abs(sums - 1) > ROW_SUM_TOLERANCE
    if unnormalised.any():
        worst = int(np.argmax(np.abs(sums - 1)))
        warn(
            f"{path}: {unnormalised.sum()} row(s) do not sum to 1 (e.g. {names.iloc[worst]} sums to {sums[worst]:.4g}); "
            "Kaggle divides each row by its sum before scoring, so check that these are the probabilities you meant"
        )
    return int(unnormalised.sum())


def read_solution(path: Path, classes: list[str]) -> pd.Series:
    """The answers as each image's class index (into `classes`), from a file in the submission's
    format with one 1 per row (`fishcomp synth`'s solution.csv, or a solution the competition
    released; columns beyond the classes, such as Kaggle's `Usage`, are ignored). A row without
    a 1 is an image the competition does not score: skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FishcompError(f"solution not found: {path}")
    try:
        truth = pd.read_csv(path, dtype={"image": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FishcompError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from exc
    missing = [c for c in ["image", *classes] if c not in truth.columns]
    if missing:
        raise FishcompError(f"{path}: no column {', '.join(missing)}; a solution has the submission's header (image,{','.join(classes)}), one 1 per row")
    if truth.image.duplicated().any():
        raise FishcompError(f"{path}: duplicate rows: {_first(truth.image[truth.image.duplicated()].unique())}")
    values = truth[classes].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    sums = values.sum(axis=1)
    one_hot = np.isin(values, (0, 1)).all(axis=1)
    broken = ~one_hot | (sums > 1)
    if broken.any():
        raise FishcompError(f"{path}: {int(broken.sum())} row(s) are not one 1 and zeros (e.g. {truth.image[broken].iloc[0]}): not answers")
    unscored = sums == 0
    if unscored.any():
        warn(f"{path}: {int(unscored.sum())} row(s) without a 1 (images the competition does not score) skipped")
    return pd.Series(values[~unscored].argmax(axis=1), index=pd.Index(truth.image[~unscored], name="image"), name="label")


def score_submission(frame: pd.DataFrame, solution: Path) -> float:
    """Log loss on the rows of `solution` that the submission has."""
    classes = [c for c in frame.columns if c != "image"]
    labels = read_solution(solution, classes)
    merged = frame.set_index("image").loc[lambda f: f.index.isin(labels.index)]
    if merged.empty:
        raise FishcompError(f"{solution}: none of the submission's rows have an answer")
    return log_loss(labels.loc[merged.index].to_numpy(), merged[classes].to_numpy(dtype=np.float64))
