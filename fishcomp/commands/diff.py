"""`fishcomp diff A B`: is run B better than run A out of fold, or is the difference noise?

Two runs scored on the same images differ image by image, and most of what separates their
means on a few hundred images is which images happened to be hard. Pairing takes that out: each
image's log loss under B minus under A, and a bootstrap over the images (resampled with
replacement, the same draw for both runs) gives the interval in which the mean difference would
fall on another sample of the same kind of images. Where the interval holds 0, the data cannot
tell the two runs apart. The same per class, where few images make wide intervals.

Any artifact with out-of-fold predictions (`oof.csv`: a trained head, a blend, a calibration) can
be compared with any other on the same training images, whatever their stages; and, where the
answers are known (`solution.csv`: synthetic data, or a solution the competition released), on a
test split's images. So can two submission files, from this tool or any other, on the answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fishcomp.cache import Artifact, compared_settings, damage, folders_named
from fishcomp.data.layout import SOLUTION_FILE, stage_of
from fishcomp.errors import FishcompError
from fishcomp.metrics import difference_verdict, image_log_losses, paired_difference
from fishcomp.predictions import OOF_COLUMNS, PREDICTING_STAGES, Predictions, read_predictions
from fishcomp.submission import check_probabilities, read_solution, read_submission

OOF = "oof.csv"
# A bootstrap over k boats has few distinct draws and its percentile interval is far too narrow
# when k is small (with 2 boats it is the spread of two numbers); below this, no interval.
MIN_GROUPS = 5


def find_run(work: Path, ref: str) -> Path:
    """The artifact folder `ref` names: a folder path, `name-key` as `fishcomp runs` lists it (the
    key shortened or not), a key, or the start of one (at least 4 characters), among the artifacts
    with out-of-fold rows."""
    as_path = Path(ref)
    if as_path.is_dir():
        if not (as_path / OOF).is_file():
            raise FishcompError(f"{ref}: no {OOF} in it, so nothing out of fold to compare (a trained head, blend or calibration has one)")
        return as_path
    if len(ref) < 4:
        raise FishcompError(f"{ref}: too short to name a run; give at least 4 characters of a key from `fishcomp runs --work {work}`")
    candidates = [folder for stage in PREDICTING_STAGES for folder in sorted((work / stage).glob("*-*"))
                  if folder.is_dir() and not folder.name.startswith(".") and (folder / OOF).is_file()]
    matches = folders_named(candidates, ref)
    if not matches:
        raise FishcompError(f"no run {ref!r} with out-of-fold predictions in {work}: give a key (or its start) from `fishcomp runs --work {work}`")
    if len(matches) > 1:
        names = ", ".join(f"{m.parent.name}/{m.name}" for m in matches[:6])
        raise FishcompError(f"{ref!r} names {len(matches)} runs ({names}): give more of the key")
    return matches[0]


def read_run(folder: Path, tests: bool = True) -> Predictions:
    """An artifact's predictions as the stages read them (`read_predictions`; `tests=False`: out
    of fold only); a damaged artifact is an error."""
    why = damage(folder)
    if why is not None:
        raise FishcompError(f"{folder}: {why}; rebuild it before comparing")
    return read_predictions(Artifact(folder.parent.name, folder.name.rsplit("-", 1)[1], folder, built=False), tests=tests)


def oof_table(predictions: Predictions, name: str) -> pd.DataFrame:
    """The out-of-fold rows of the validated images (a hold-out split validates only some),
    indexed by image; the cross-fitted ones where the artifact has them (a blend or calibration
    fitted on its own out-of-fold rows scores better on them than it would on new ones). An image
    twice is an error."""
    frame = predictions.validated_cross_fitted
    if frame.image.duplicated().any():
        raise FishcompError(f"{name}: an image has more than one out-of-fold row, so its rows are not one prediction per image")
    return frame.set_index("image")


def in_sample(folder: Path, predictions: Predictions) -> bool:
    """A blend or calibration whose out-of-fold rows were fitted on themselves: built before
    fishcomp kept cross-fitted rows, or on a hold-out split, where nothing can be cross-fitted."""
    return folder.parent.name in ("ensemble", "calibrate") and predictions.cross_fitted is None


def answered_test_table(predictions: Predictions, split: str, solution: Path, name: str) -> pd.DataFrame:
    """A run's predictions for a test split in the out-of-fold table's shape, each row's label
    read from the answers (`solution.csv`, one-hot): for data whose answers are known."""
    if split not in predictions.tests:
        raise FishcompError(f"{name} has no {split} predictions; the splits it has: {', '.join(sorted(predictions.tests))}")
    if not solution.is_file():
        raise FishcompError(f"no {solution.name} in {solution.parent}: test predictions can be compared only where the answers are known "
                            "(synthetic data, or a released solution: pass --solution FILE); compare out of fold without --split")
    frame = predictions.tests[split].set_index("image")[predictions.classes]
    return _answered(frame, read_solution(solution, predictions.classes), solution, name)


def _answered(frame: pd.DataFrame, labels: pd.Series, solution: Path, name: str) -> pd.DataFrame:
    """`frame`'s rows that `labels` answers, with a `label` column first (the out-of-fold table's shape)."""
    answered = frame.index.intersection(labels.index)
    if len(answered) == 0:
        raise FishcompError(f"{solution}: none of {name}'s images has an answer")
    return pd.concat([labels.loc[answered].rename("label"), frame.loc[answered]], axis=1)


def _settings(folder: Path) -> dict:
    """The run's resolved config as flat text, without its null settings: a setting added since
    the run was built is absent from its config, and absent and null are the same default."""
    config, manifest = folder / "config.yaml", folder / "manifest.json"
    flat = compared_settings(yaml.safe_load(config.read_text()) if config.is_file() else None,
                             json.loads(manifest.read_text()) if manifest.is_file() else {})
    return {key: value for key, value in flat.items() if value != "None"}


def boats(data: Path, images: pd.Index) -> pd.Series:
    """Each image's boat, as far as the data tells it: its size on disk (`split.kind:
    group_kfold`'s grouping; the competition's boats film at sizes of their own)."""
    from fishcomp.data.images import read_size
    from fishcomp.data.layout import load_dataset

    paths = load_dataset(data).images.set_index("image").path
    missing = images.difference(paths.index)
    if len(missing):
        raise FishcompError(f"{len(missing)} compared images (e.g. {missing[0]}) are not in {data}: give the --data the runs were made on")
    return pd.Series([f"{w}x{h}" for w, h in (read_size(data / paths[image]) for image in images)], index=images)


def resampled_by(by: str, data: Path):
    """`groups_of` for `--by`: None to resample images, each image's boat to resample boats."""
    if by not in ("image", "boat"):
        raise FishcompError(f"--by {by}: image or boat")
    return (lambda images: boats(data, images)) if by == "boat" else None


def compare_frames(frame_a: pd.DataFrame, frame_b: pd.DataFrame, resamples: int = 2000, seed: int = 0,
                   names: tuple[str, str] = ("A", "B"), per_class: bool = True, groups_of=None, parts_of=None) -> dict:
    """Two out-of-fold tables (indexed by image: label, fold, one column per class), paired by
    image: the difference over all their common images, then per part where `parts_of` (the
    common images -> a part label per image) finds more than one, then (`per_class`) per class.
    With `groups_of` (the common images -> a group label per image), whole groups are resampled."""
    if resamples < 100:
        raise FishcompError(f"--resamples {resamples}: at least 100, or the interval's ends are a handful of draws")
    a, b = names
    classes_a = [c for c in frame_a.columns if c not in OOF_COLUMNS]
    classes_b = [c for c in frame_b.columns if c not in OOF_COLUMNS]
    if classes_a != classes_b:
        raise FishcompError(f"{a} and {b} predict different classes ({', '.join(classes_a)} against {', '.join(classes_b)})")
    common = frame_a.index.intersection(frame_b.index)
    if len(common) == 0:
        raise FishcompError(f"{a} and {b} have no image in common: not runs on the same images")
    labels, labels_b = frame_a.loc[common, "label"].to_numpy(), frame_b.loc[common, "label"].to_numpy()
    if not np.array_equal(labels, labels_b):
        raise FishcompError(f"{a} and {b} give {int(np.sum(labels != labels_b))} images different labels: not runs on the same data")
    loss_a = image_log_losses(labels, frame_a.loc[common, classes_a].to_numpy())
    loss_b = image_log_losses(labels, frame_b.loc[common, classes_b].to_numpy())
    rng = np.random.default_rng(seed)
    groups = None if groups_of is None else np.asarray(groups_of(common))
    if groups is not None and len(np.unique(groups)) < MIN_GROUPS:
        raise FishcompError(f"these images come from {len(np.unique(groups))} boats (image sizes): too few to resample boats "
                            f"(at least {MIN_GROUPS}); compare by image")
    rows = [{"scope": "all", **paired_difference(loss_a, loss_b, resamples, rng, groups)}]
    parts = None if parts_of is None else np.asarray(parts_of(common))
    scopes = [(part, parts == part) for part in (np.unique(parts) if parts is not None and len(np.unique(parts)) > 1 else [])]
    scopes += [(name, labels == index) for index, name in enumerate(classes_a if per_class else [])]
    for name, mine in scopes:
        if mine.any():
            rows.append({"scope": name, **paired_difference(loss_a[mine], loss_b[mine], resamples, rng, None if groups is None else groups[mine])})
    return {"rows": rows, "only_a": len(frame_a) - len(common), "only_b": len(frame_b) - len(common)}


def submission_table(path: Path, classes: list[str] | None = None) -> pd.DataFrame:
    """A submission file's rows indexed by image, its columns in `classes`' order (the other
    submission's), its probabilities checked as `validate` checks them (no data folder needed)."""
    frame = read_submission(path)
    mine = [c for c in frame.columns if c != "image"]
    if "image" not in frame.columns or not mine:
        raise FishcompError(f"{path}: not a submission (its header is {','.join(map(str, frame.columns))}; expected image,<one column per class>)")
    if classes is not None and sorted(mine) != sorted(classes):
        raise FishcompError(f"{path}: its classes ({', '.join(mine)}) are not the other submission's ({', '.join(classes)})")
    if frame.image.duplicated().any():
        raise FishcompError(f"{path}: duplicate rows, e.g. {frame.image[frame.image.duplicated()].iloc[0]}")
    check_probabilities(frame, mine, path)
    return frame.set_index("image")[classes or mine].astype(np.float64)


def compare_submissions(a: Path, b: Path, solution: Path, resamples: int = 2000, seed: int = 0, split: str | None = None,
                        groups_of=None) -> dict:
    """`compare_frames` on two submission files' rows that the solution answers (`split`: one
    stage's only), with a row per stage where they hold both; and each file's rows left out."""
    if not solution.is_file():
        raise FishcompError(f"no solution {solution}: submissions can be compared only on the answers "
                            "(a solution the competition released, or synthetic data's solution.csv; pass --solution FILE)")
    first = submission_table(a)
    tables = [first, submission_table(b, list(first.columns))]
    labels = read_solution(solution, list(first.columns))
    if split is not None:
        tables = [table[(stage_of(table.index) == split).to_numpy()] for table in tables]
    frames = [_answered(table, labels, solution, path.name) for path, table in zip((a, b), tables)]
    result = compare_frames(*frames, resamples, seed, names=(a.name, b.name), groups_of=groups_of, parts_of=stage_of)
    left_out = {path.name: len(table) - len(frame) for path, table, frame in zip((a, b), tables, frames)}
    return {**result, "a": a, "b": b, "differs": None, "unanswered": left_out, "solution": solution, "split": split}


def compare_runs(a: Path, b: Path, resamples: int = 2000, seed: int = 0, split: str = "valid", solution: Path | None = None,
                 groups_of=None) -> dict:
    """`compare_frames` on two artifacts' out-of-fold rows (`split: valid`) or their predictions for
    a test split scored on `solution`, with the settings in which they differ."""
    runs = [(folder.name, read_run(folder, tests=split != "valid")) for folder in (a, b)]
    optimistic = [folder.name for folder, (_, predictions) in zip((a, b), runs) if split == "valid" and in_sample(folder, predictions)]
    if split == "valid":
        frames = [oof_table(predictions, name) for name, predictions in runs]
    else:
        frames = [answered_test_table(predictions, split, solution, name) for name, predictions in runs]
    result = compare_frames(*frames, resamples, seed, names=(a.name, b.name), groups_of=groups_of)
    same_config = a.parent.name == b.parent.name and a.name.rsplit("-", 1)[0] == b.name.rsplit("-", 1)[0]
    settings_a, settings_b = _settings(a), _settings(b)
    # Runs of two configs (a head against a blend) differ in most settings: only runs of one
    # config, one stage, have a difference worth listing.
    differs = {k: (settings_a.get(k, "-"), settings_b.get(k, "-"))
               for k in sorted(set(settings_a) | set(settings_b)) if settings_a.get(k) != settings_b.get(k)} if same_config else None
    return {**result, "a": a, "b": b, "differs": differs, "in_sample": optimistic}


def compare(ref_a: str, ref_b: str, work: Path = Path("artifacts"), split: str | None = None, solution: Path | None = None,
            data: Path = Path("data"), by: str = "image", resamples: int = 2000, seed: int = 0) -> dict:
    """What `fishcomp diff A B` compares: two submission files (both named as files) on the
    solution (default DATA/solution.csv), or two runs of `work` out of fold (`split` None or
    valid) or on a test split; `by`: resample images, or whole boats (read from `data`)."""
    solution = Path(solution) if solution is not None else Path(data) / SOLUTION_FILE
    groups_of = resampled_by(by, Path(data))
    for ref in (ref_a, ref_b):
        if ref.endswith((".csv", ".csv.gz")) and not Path(ref).is_file():
            raise FishcompError(f"submission not found: {ref}")
    files = [Path(ref).is_file() for ref in (ref_a, ref_b)]
    if any(files):
        if not all(files):
            raise FishcompError(f"{ref_a if files[0] else ref_b} is a file and the other is not: compare two submissions, or two runs")
        if split not in (None, "test_stg1", "test_stg2"):
            raise FishcompError(f"--split {split}: submissions hold test rows only; test_stg1 or test_stg2, or leave it out for every answered row")
        return compare_submissions(Path(ref_a), Path(ref_b), solution, resamples=resamples, seed=seed, split=split, groups_of=groups_of)
    if not work.is_dir():
        raise FishcompError(f"no artifact folder {work}; pass --work, or run something first")
    split = split or "valid"
    if split not in ("valid", "test_stg1", "test_stg2"):
        raise FishcompError(f"--split {split}: one of valid, test_stg1, test_stg2")
    return {**compare_runs(find_run(work, ref_a), find_run(work, ref_b), resamples=resamples, seed=seed, split=split,
                           solution=solution, groups_of=groups_of), "split": split}


def shown(result: dict, side: str) -> str:
    """How a compared run or file is named in the output."""
    path = result[side]
    return str(path) if "unanswered" in result else f"{path.parent.name}/{path.name}"


def compared_on(result: dict) -> str:
    """Which predictions `result` paired, in words."""
    if "unanswered" in result:
        return f"on {result['solution'].name}" + (f" ({result['split']} rows)" if result["split"] else "")
    return "out of fold" if result["split"] == "valid" else f"on {result['split']}"


COLUMNS = ["scope", "images", "logloss_a", "logloss_b", "difference", "low", "high", "b_better", "b_worse", "verdict"]


def table_cells(rows: list[dict]) -> list[list]:
    cells = []
    for row in rows:
        cells.append([row["scope"], row["images"], *(f"{row[k]:.4f}" for k in ("logloss_a", "logloss_b")),
                      *(f"{row[k]:+.4f}" for k in ("difference", "low", "high")), row["b_better"], row["b_worse"], difference_verdict(row)])
    return cells


def show_comparison(results: list[dict], fmt: str = "table") -> None:
    """`fishcomp diff`'s output: for one B, what was paired, the settings that differ and the
    table per scope under a one-line verdict; for several, one overall row each. `csv` and `json`
    print the table alone, for scripts; warnings go to stderr either way."""
    from fishcomp.console import info, table, warn

    for name in sorted({name for result in results for name in result.get("in_sample", [])}):
        warn(f"{name}: its out-of-fold rows were fitted on themselves (no cross-fitted rows: built by an older fishcomp, or a hold-out split), "
             "so they flatter it; rebuild it for an honest comparison")
    if len(results) > 1:  # each B against A, its overall row
        rows = [{**result["rows"][0], "scope": shown(result, "b")} for result in results]
        title = f"each B - A ({shown(results[0], 'a')}) {compared_on(results[0])}, 95 % intervals"
        table(["b", *COLUMNS[1:]], table_cells(rows), title=title if fmt == "table" else None, fmt=fmt)
        return
    result = results[0]
    overall = result["rows"][0]
    if fmt != "table":
        table(COLUMNS, table_cells(result["rows"]), fmt=fmt)
        return
    submissions = "unanswered" in result
    info(f"A {shown(result, 'a')}, B {shown(result, 'b')}")
    if submissions:
        left = [f"{n} of {name}" for name, n in result["unanswered"].items() if n]
        if left:
            info(f"rows without an answer in {result['solution']}, left out: {', '.join(left)}")
    if result["only_a"] or result["only_b"]:
        info(f"compared on the {overall['images']} images both {'hold' if submissions else 'predicted out of fold'} "
             f"({result['only_a']} only in A, {result['only_b']} only in B)")
    if not submissions and result["differs"] is None:
        info("A and B are runs of different configs or stages: their settings are not compared")
    elif not submissions and result["differs"]:
        info("settings that differ (A -> B): " + "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in result["differs"].items()))
    where = compared_on(result)
    if overall["groups"] is not None:
        where += f", {overall['groups']} boats resampled"
    title = (f"B - A: {overall['difference']:+.4f} {where}, 95 % interval [{overall['low']:+.4f}, {overall['high']:+.4f}] "
             f"over {overall['images']} images: {difference_verdict(overall)}")
    table(COLUMNS, table_cells(result["rows"]), title=title, fmt=fmt)
