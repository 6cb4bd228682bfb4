"""`fishcomp runs`: every trained head, blend, calibration and submission in the cache, side by
side (like `dvc exp show`): its scores, time, when it was built, and the settings in which it
differs from the other runs of the same config name.

Everything comes from the artifacts' own files (summary.json, manifest.json, config.yaml), so
the table shows exactly what each run recorded; the cache stays the one source of truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from fishcomp.cache import compared_settings, damage

STAGES = ("train", "ensemble", "calibrate", "submit")
COLUMNS = ["name", "stage", "key", "valid_logloss", "cross_fitted", "vs_best", "accuracy", "seconds", "created", "differs"]
# What each artifact was built on (the graph's `describe_machine` line, in its manifest): its
# seconds, and the last digits of its scores, depend on it.
MACHINE = "machine"
# With the answers (`--solution`): each run's log loss on each test stage's answered images.
TEST_COLUMNS = ["test_stg1", "test_stg2"]
# With scores recorded by `fishcomp lb`: what Kaggle gave each submission.
LB_COLUMNS = ["public_lb", "private_lb"]


def _row(folder: Path, stage: str) -> dict | None:
    if damage(folder) is not None:
        return None  # unfinished or damaged: not a run to compare
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    manifest = json.loads((folder / "manifest.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
    label, key = folder.name.rsplit("-", 1)
    if stage == "submit":
        score, cross = summary.get("oof_logloss_clipped"), None
    else:
        score, cross = summary.get("valid_logloss"), summary.get("valid_logloss_cross_fitted")
    return {
        "name": summary.get("name", label), "stage": stage, "key": key, "valid_logloss": score, "cross_fitted": cross,
        "accuracy": summary.get("valid_accuracy"), "seconds": manifest.get("seconds"), "created": manifest.get("created"),
        MACHINE: manifest.get(MACHINE), "path": str(folder), "settings": compared_settings(config, manifest),
    }


def collect_runs(work: Path, keys: set[str] | None = None, solution: Path | None = None) -> list[dict]:
    """One row per finished artifact of the stages above (only `keys`, when given), with
    `differs`: the settings whose values are not the same across runs of that name and stage;
    with `solution`, each run's test scores on it."""
    rows = []
    for stage in STAGES:
        for folder in sorted((work / stage).glob("*-*")) if (work / stage).is_dir() else []:
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            row = _row(folder, stage)
            if row is not None:
                rows.append(row)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["name"], row["stage"]), []).append(row)
    for group in groups.values():
        # An artifact built before its stage kept its config has none to compare: every setting
        # would "differ" from it, so it is left out of the comparison (its differs stays empty).
        known = [r for r in group if r["settings"]]
        every = set().union(*(r["settings"] for r in known))
        varying = sorted(k for k in every if len({r["settings"].get(k) for r in known}) > 1)
        for row in group:
            row["differs"] = " ".join(f"{k}={row['settings'].get(k, '-')}" for k in varying) if row["settings"] else ""
        _against_best(group)
    if keys is not None:
        rows = [row for row in rows if row["key"] in keys]
    if solution is not None:
        _test_scores(rows, solution)
    _leaderboard_scores(rows, work)
    return rows


def _leaderboard_scores(rows: list[dict], work: Path) -> None:
    from fishcomp.commands.leaderboard import latest_scores
    from fishcomp.console import warn
    from fishcomp.errors import FishcompError

    try:
        recorded = latest_scores(work)
    except FishcompError as exc:  # the table is worth having without them
        warn(f"runs: no leaderboard columns: {exc}")
        return
    for row in rows:
        if row["stage"] == "submit" and row["key"] in recorded:
            row["public_lb"], row["private_lb"] = recorded[row["key"]]["public"], recorded[row["key"]]["private"]


def has_leaderboard(rows: list[dict]) -> bool:
    return any("public_lb" in row for row in rows)


def _test_files(folder: Path, stage: str) -> list[Path]:
    if stage == "submit":  # the stage-2 file holds both stages' rows
        stage_two = folder / "submission_stg2.csv"
        return [stage_two if stage_two.is_file() else folder / "submission_stg1.csv"]
    return [folder / f"{split}.csv" for split in TEST_COLUMNS]


def _test_scores(rows: list[dict], solution: Path) -> None:
    """Each run's log loss on each test stage's images that `solution` answers (a solution the
    competition released, or synthetic data's): after stage 1's answers are out, the runs table
    shows what each run would have scored."""
    from fishcomp.data.layout import stage_of
    from fishcomp.errors import FishcompError
    from fishcomp.metrics import log_loss
    from fishcomp.submission import read_solution

    if not solution.is_file():
        raise FishcompError(f"no solution {solution}: pass the answers in the submission's format (--solution FILE)")
    answers: dict[tuple, pd.Series] = {}
    for row in rows:
        files = [f for f in _test_files(Path(row["path"]), row["stage"]) if f.is_file()]
        if not files:
            continue
        frame = pd.concat([pd.read_csv(f, dtype={"image": str}) for f in files]).set_index("image")
        classes = tuple(c for c in frame.columns if c != "image")
        if classes not in answers:
            answers[classes] = read_solution(solution, list(classes))
        labels = answers[classes]
        stages = stage_of(frame.index)
        for split in TEST_COLUMNS:
            answered = frame.index[(stages == split).to_numpy()].intersection(labels.index)
            if len(answered):
                row[split] = log_loss(labels.loc[answered].to_numpy(), frame.loc[answered, list(classes)].to_numpy(dtype=float))


def _against_best(group: list[dict]) -> None:
    """`vs_best`: each run's out-of-fold log loss minus the best run's of its name and stage,
    paired image by image (cross-fitted rows where the artifact has them), with the 95 % bootstrap
    interval (`fishcomp diff best run`): after a sweep, which runs the data cannot tell from the best."""
    from fishcomp.commands.diff import OOF, compare_frames, oof_table, read_run
    from fishcomp.errors import FishcompError

    for row in group:
        row["vs_best"] = None
    scored = [r for r in group if r["valid_logloss"] is not None and (Path(r["path"]) / OOF).is_file()]
    if len(scored) < 2:
        return
    # A blend's or calibration's own rows flatter it; its cross-fitted estimate is what is paired.
    best = min(scored, key=lambda r: r["valid_logloss"] if r["cross_fitted"] is None else r["cross_fitted"])
    best["vs_best"] = "best"
    best_rows = oof_table(read_run(Path(best["path"]), tests=False), best["path"])
    for row in scored:
        if row is best:
            continue
        try:
            overall = compare_frames(best_rows, oof_table(read_run(Path(row["path"]), tests=False), row["path"]), resamples=1000, per_class=False)["rows"][0]
        except FishcompError:
            continue  # another data set's run under the same name: nothing to pair
        row["vs_best"] = f"{overall['difference']:+.4f} [{overall['low']:+.4f}, {overall['high']:+.4f}]"


def columns(with_tests: bool, with_lb: bool = False, with_machine: bool = False) -> list[str]:
    """The table's columns; the test scores (with the answers) and the leaderboard's (where `fishcomp
    lb` recorded some) beside the out-of-fold ones; the machine beside the seconds it qualifies."""
    after = COLUMNS.index("vs_best") + 1
    seconds = COLUMNS.index("seconds") + 1
    return (COLUMNS[:after] + (TEST_COLUMNS if with_tests else []) + (LB_COLUMNS if with_lb else []) + COLUMNS[after:seconds]
            + ([MACHINE] if with_machine else []) + COLUMNS[seconds:])


def machine_legend(rows: list[dict]) -> dict[str, str] | None:
    """Where the rows come from more than one machine, a short label for each (A, B, ... in the
    rows' order), for a table whose every row would otherwise repeat a long line; None where they
    share one (an artifact from before manifests named their machine counts as none)."""
    seen = list(dict.fromkeys(r[MACHINE] for r in rows if r.get(MACHINE)))
    if len(seen) < 2:
        return None
    return {machine: (chr(ord("A") + n) if n < 26 else str(n + 1)) for n, machine in enumerate(seen)}


def sort_rows(rows: list[dict], column: str, with_tests: bool = False, with_lb: bool = False, with_machine: bool = False) -> list[dict]:
    names = columns(with_tests, with_lb, with_machine)
    if column not in names:
        from fishcomp.errors import FishcompError
        from fishcomp.suggest import did_you_mean

        hint = (" (test_stg1 and test_stg2 need --solution)" if column in TEST_COLUMNS else
                " (no leaderboard score recorded: `fishcomp lb FILE SCORE` or `fishcomp lb --pull`)" if column in LB_COLUMNS else "")
        raise FishcompError(f"--sort {column}: not a column{did_you_mean(column, names)}{hint} (columns: {', '.join(names)})")
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]
    return sorted(present, key=lambda r: r[column]) + missing


def table_cells(rows: list[dict], with_tests: bool = False, with_lb: bool = False, machine_cells: dict[str, str] | None = None,
                with_machine: bool = False) -> list[list]:
    """`with_machine`: a machine column, each row's full line or, with `machine_cells`, its label."""
    def number(value, digits=4):
        return "" if value is None else f"{value:.{digits}f}"

    def machine(row):
        value = row.get(MACHINE) or ""
        return [(machine_cells or {}).get(value, value)] if with_machine else []

    return [
        [r["name"], r["stage"], r["key"], number(r["valid_logloss"]), number(r["cross_fitted"]), r.get("vs_best") or "",
         *([number(r.get(split)) for split in TEST_COLUMNS] if with_tests else []),
         *([number(r.get(score)) for score in LB_COLUMNS] if with_lb else []),
         number(r["accuracy"], 3), number(r["seconds"], 1), *machine(r), r["created"] or "", r["differs"]]
        for r in rows
    ]
