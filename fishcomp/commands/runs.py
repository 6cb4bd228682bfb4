"""`fishcomp runs`: every trained head, blend, calibration and submission in the cache, side by
side (like `dvc exp show`): its scores, time, when it was built, and the settings in which it
differs from the other runs of the same config name.

Everything comes from the artifacts' own files (summary.json, manifest.json, config.yaml), so
the table shows exactly what each run recorded; the cache stays the one source of truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fishcomp.cache import damage
from fishcomp.config import flatten_config

STAGES = ("train", "ensemble", "calibrate", "submit")
COLUMNS = ["name", "stage", "key", "valid_logloss", "cross_fitted", "vs_best", "accuracy", "seconds", "created", "differs"]


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
        "path": str(folder), "settings": flatten_config(config or {}),
    }


def collect_runs(work: Path, keys: set[str] | None = None) -> list[dict]:
    """One row per finished artifact of the stages above (only `keys`, when given), with
    `differs`: the settings whose values are not the same across runs of that name and stage."""
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
        every = set().union(*(r["settings"] for r in group))
        varying = sorted(k for k in every if len({r["settings"].get(k) for r in group}) > 1)
        for row in group:
            row["differs"] = " ".join(f"{k}={row['settings'].get(k, '-')}" for k in varying)
        _against_best(group)
    if keys is not None:
        rows = [row for row in rows if row["key"] in keys]
    return rows


def _against_best(group: list[dict]) -> None:
    """`vs_best`: each run's out-of-fold log loss minus the best run's of its name and stage,
    paired image by image, with the 95 % bootstrap interval (`fishcomp diff best run`): after a
    sweep, which runs the data cannot tell from the best."""
    from fishcomp.commands.diff import OOF, compare_frames, oof_table, read_run
    from fishcomp.errors import FishcompError

    for row in group:
        row["vs_best"] = None
    scored = [r for r in group if r["valid_logloss"] is not None and (Path(r["path"]) / OOF).is_file()]
    if len(scored) < 2:
        return
    best = min(scored, key=lambda r: r["valid_logloss"])
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


def sort_rows(rows: list[dict], column: str) -> list[dict]:
    if column not in COLUMNS:
        from fishcomp.errors import FishcompError
        from fishcomp.suggest import did_you_mean

        raise FishcompError(f"--sort {column}: not a column{did_you_mean(column, COLUMNS)} (columns: {', '.join(COLUMNS)})")
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]
    return sorted(present, key=lambda r: r[column]) + missing


def table_cells(rows: list[dict]) -> list[list]:
    def number(value, digits=4):
        return "" if value is None else f"{value:.{digits}f}"

    return [
        [r["name"], r["stage"], r["key"], number(r["valid_logloss"]), number(r["cross_fitted"]), r.get("vs_best") or "", number(r["accuracy"], 3),
         number(r["seconds"], 1), r["created"] or "", r["differs"]]
        for r in rows
    ]
