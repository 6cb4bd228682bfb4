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
    return {"stage": stage, "rows": len(frame), "unnormalised_rows": int(unnormalised.sum())}


def score_submission(frame: pd.DataFrame, solution: Path) -> float:
    """Log loss on the rows of `solution` (one-hot, submission format) that the submission has."""
    truth = pd.read_csv(solution, dtype={"image": str}).set_index("image")
    merged = frame.set_index("image").loc[lambda f: f.index.isin(truth.index)]
    if merged.empty:
        raise FishcompError(f"{solution}: none of the submission's rows have an answer")
    classes = list(truth.columns)
    labels = truth.loc[merged.index, classes].to_numpy().argmax(axis=1)
    return log_loss(labels, merged[classes].to_numpy(dtype=np.float64))

