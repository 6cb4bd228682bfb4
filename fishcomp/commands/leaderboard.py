"""`fishcomp lb`: the scores Kaggle gave each uploaded submission, beside the out-of-fold
estimate it was chosen by.

A competitor lives by whether their validation tracks the leaderboard: a run that is better out of
fold but worse on the public leaderboard says the folds do not look like the test images (new
boats, a shifted class mix) or that the public split is small and noisy. Kaggle keeps the scores,
fishcomp keeps the runs; this joins them. Each upload is matched to the submission artifact that
wrote it, by the file's content (whatever it was renamed to, gzipped or not) or by the artifact's
key, which `--kaggle` puts in the submission's message so that `--pull` can read the scores back.

The scores live in `<work>/leaderboard.csv`, one row per record, the newest per submission
winning; written whole or not at all.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pandas as pd

from fishcomp.cache import damage, folders_named, write_atomic
from fishcomp.errors import FishcompError

LEDGER = "leaderboard.csv"
LEDGER_COLUMNS = ["key", "name", "public", "private", "recorded", "source", "note"]
# What `fishcomp lb` prints, one row per submission with a record.
COLUMNS = ["name", "key", "valid_logloss", "public", "private", "public_minus_valid", "recorded", "source", "note"]
SUBMISSION_FILES = ("submission_stg1.csv", "submission_stg2.csv")
# Kaggle's listing (`kaggle competitions submissions -c C --csv`).
KAGGLE_COLUMNS = ("fileName", "date", "description", "status", "publicScore", "privateScore")
KEY = re.compile(r"\b[0-9a-f]{16}\b")
# Below this many scored submissions a rank correlation says nothing.
MIN_FOR_AGREEMENT = 3


def _submissions(work: Path) -> list[Path]:
    folder = work / "submit"
    candidates = sorted(folder.glob("*-*")) if folder.is_dir() else []
    return [f for f in candidates if f.is_dir() and not f.name.startswith(".") and damage(f) is None]


def _content_digest(path: Path) -> str:
    """sha256 of the file's CSV bytes: a `.gz` is read through, as Kaggle reads it."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    digest = hashlib.sha256()
    with opener(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def find_submission(work: Path, ref: str) -> Path:
    """The submit artifact `ref` names: a submission file it wrote (matched by content), or its
    key, the start of it, or `name-key` as `fishcomp runs` lists it."""
    folders = _submissions(work)
    as_path = Path(ref)
    if as_path.is_file():
        try:
            digest = _content_digest(as_path)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise FishcompError(f"{ref}: cannot read it ({exc})") from exc
        for folder in folders:
            files = json.loads((folder / "manifest.json").read_text()).get("files", {})
            if any(files.get(name, {}).get("sha256") == digest for name in SUBMISSION_FILES):
                return folder
        raise FishcompError(
            f"{ref} is not a submission in {work}'s cache (no submit artifact wrote these bytes); "
            "give the --work folder it was written from, or the run's key from `fishcomp runs`"
        )
    if as_path.suffix in (".csv", ".gz"):
        raise FishcompError(f"submission not found: {ref}")
    if len(ref) < 4:
        raise FishcompError(f"{ref}: too short to name a submission; give at least 4 characters of a key from `fishcomp runs --work {work}`")
    matches = folders_named(folders, ref)
    if not matches:
        raise FishcompError(f"no submission {ref!r} in {work}: give a submission file, or a submit key from `fishcomp runs --work {work}`")
    if len(matches) > 1:
        raise FishcompError(f"{ref!r} names {len(matches)} submissions ({', '.join(m.name for m in matches[:6])}): give more of the key")
    return matches[0]


def read_ledger(work: Path) -> pd.DataFrame:
    path = work / LEDGER
    if not path.is_file():
        return pd.DataFrame(columns=LEDGER_COLUMNS)
    try:
        frame = pd.read_csv(path, dtype={"key": str, "name": str, "recorded": str, "source": str, "note": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FishcompError(f"{path} is not a leaderboard file fishcomp wrote ({exc}); move it aside") from exc
    missing = [c for c in LEDGER_COLUMNS if c not in frame.columns]
    if missing:
        raise FishcompError(f"{path} lacks the column(s) {', '.join(missing)}; move it aside")
    for column in ("public", "private"):  # a hand-edited file may hold anything
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if (numbers.isna() & frame[column].notna()).any():
            raise FishcompError(f"{path}: a {column} score is not a number; fix it or move the file aside")
        frame[column] = numbers
    return frame[LEDGER_COLUMNS]


def _append(work: Path, ledger: pd.DataFrame, rows: list[dict]) -> None:
    """`ledger` with `rows` after it, written whole or not at all."""
    frame = pd.concat([ledger, pd.DataFrame(rows)], ignore_index=True) if len(ledger) else pd.DataFrame(rows)
    buffer = io.StringIO()
    frame[LEDGER_COLUMNS].to_csv(buffer, index=False)
    write_atomic(work / LEDGER, buffer.getvalue())


def _score(value, what: str) -> float | None:
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise FishcompError(f"{what} {value}: a log loss is a finite number of at least 0")
    return number


def _name(folder: Path) -> str:
    return folder.name.rsplit("-", 1)[0]


def record(work: Path, ref: str, public: float | None, private: float | None = None, note: str | None = None, source: str = "manual") -> dict:
    """Adds a score (or, from an upload, a pending row without one) for the submission `ref` names."""
    folder = find_submission(work, ref)
    row = {
        "key": folder.name.rsplit("-", 1)[1], "name": _name(folder),
        "public": _score(public, "public score"), "private": _score(private, "private score"),
        "recorded": datetime.now().isoformat(timespec="seconds"), "source": source, "note": note or "",
    }
    ledger = read_ledger(work)
    _append(work, ledger, [row])
    return row


def kaggle_listing(competition: str) -> pd.DataFrame:
    """Every submission of this account to `competition`, as the official kaggle CLI lists them."""
    executable = shutil.which("kaggle")
    if executable is None:
        raise FishcompError("--pull needs the kaggle CLI: `pip install kaggle`, then put your API token in ~/.kaggle/kaggle.json")
    result = subprocess.run([executable, "competitions", "submissions", "-c", competition, "--csv"], capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or [f"exit code {result.returncode}"]
        raise FishcompError(f"kaggle competitions submissions failed: {lines[-1]}")
    text = result.stdout
    # Older CLIs print a notice (a newer version exists) before the CSV.
    start = text.find("fileName")
    if start < 0:
        return pd.DataFrame(columns=list(KAGGLE_COLUMNS))
    listing = pd.read_csv(io.StringIO(text[start:]), dtype=str, keep_default_na=False)
    missing = [c for c in KAGGLE_COLUMNS if c not in listing.columns]
    if missing:
        raise FishcompError(f"kaggle competitions submissions printed no {', '.join(missing)} column(s); update the kaggle CLI")
    return listing


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _same(value: float | None, recorded) -> bool:
    return pd.isna(recorded) if value is None else (not pd.isna(recorded) and float(recorded) == value)


def pull(work: Path, competition: str) -> dict:
    """Records the scores Kaggle gave the uploads it can match to this cache's submissions: by the
    artifact key in the message (`--kaggle` puts it there), or by the message of an upload that
    `--kaggle` recorded. Returns counts: listed, matched, new, pending (matched, not scored yet)."""
    listing = kaggle_listing(competition)
    folders = {f.name.rsplit("-", 1)[1]: f for f in _submissions(work)}
    ledger = read_ledger(work)
    uploads: dict[str, set[str]] = {}
    for row in ledger.itertuples():
        if row.source == "upload" and isinstance(row.note, str) and row.note:
            uploads.setdefault(row.note, set()).add(row.key)
    counts = {"listed": len(listing), "matched": 0, "new": 0, "pending": 0}
    rows = []
    for entry in listing.itertuples():
        keys = [k for k in KEY.findall(entry.description) if k in folders]
        uploaded = uploads.get(entry.description, set())
        # One message given to several uploads names none of them.
        key = keys[0] if keys else next(iter(uploaded)) if len(uploaded) == 1 else None
        if key is None or key not in folders:
            continue
        counts["matched"] += 1
        public, private = _number(entry.publicScore), _number(entry.privateScore)
        if public is None and private is None:
            counts["pending"] += 1
            continue
        known = ledger[(ledger.key == key) & (ledger.source == "kaggle")]
        if any(_same(public, r.public) and _same(private, r.private) for r in known.itertuples()):
            continue  # pulled before
        rows.append({"key": key, "name": _name(folders[key]), "public": public, "private": private,
                     "recorded": datetime.now().isoformat(timespec="seconds"), "source": "kaggle", "note": f"{entry.date} {entry.description}".strip()})
    if rows:
        _append(work, ledger, rows)
    counts["new"] = len(rows)
    return counts


def pulled(work: Path, competition: str) -> str:
    """`pull`, said in a line."""
    counts = pull(work, competition)
    said = (f"{counts['listed']} Kaggle submissions to {competition}, {counts['matched']} of them this cache's "
            f"({counts['new']} new scores, {counts['pending']} not scored yet)")
    if counts["listed"] > counts["matched"]:
        said += "; the others name no submission here: record them with `fishcomp lb FILE SCORE`"
    return said


def _newest(ledger: pd.DataFrame) -> dict[str, tuple[pd.Series, bool]]:
    """Each submission's newest scored record, or its newest record where none has a score (an
    upload not scored yet): key -> (record, scored)."""
    newest = {}
    for key, records in ledger.groupby("key", sort=False):
        scored = records[records.public.notna() | records.private.notna()]
        newest[key] = ((scored if len(scored) else records).iloc[-1], bool(len(scored)))
    return newest


def _number_or_none(value) -> float | None:
    return None if pd.isna(value) else float(value)


def latest_scores(work: Path) -> dict[str, dict]:
    """Each scored submission's newest scores (key -> public, private), for `fishcomp runs`."""
    return {key: {"public": _number_or_none(record.public), "private": _number_or_none(record.private)}
            for key, (record, scored) in _newest(read_ledger(work)).items() if scored}


def scores(work: Path) -> pd.DataFrame:
    """One row per submission with a record: its out-of-fold log loss (clipped, as submitted)
    beside its newest scores; an upload not scored yet shows as pending."""
    folders = {f.name.rsplit("-", 1)[1]: f for f in _submissions(work)}
    rows = []
    for key, (newest, scored) in _newest(read_ledger(work)).items():
        folder = folders.get(key)
        summary = json.loads((folder / "summary.json").read_text()) if folder is not None and (folder / "summary.json").is_file() else {}
        valid = summary.get("oof_logloss_clipped")
        public = _number_or_none(newest.public)
        rows.append({
            "name": newest["name"], "key": key, "valid_logloss": valid, "public": public,
            "private": _number_or_none(newest.private),
            "public_minus_valid": None if public is None or valid is None else public - valid,
            "recorded": newest.recorded, "source": newest.source if scored else "pending",
            "note": "" if pd.isna(newest.note) else newest.note,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def agreement(table: pd.DataFrame) -> str | None:
    """Does the out-of-fold estimate rank the submissions as the public leaderboard does? The
    Spearman rank correlation over those with both, in words; None below three."""
    both = table.dropna(subset=["valid_logloss", "public"])
    if len(both) < MIN_FOR_AGREEMENT:
        return None
    rho = both.valid_logloss.astype(float).corr(both.public.astype(float), method="spearman")
    if not math.isfinite(rho):
        return f"{len(both)} scored submissions, but their out-of-fold or public scores are all equal: no ranking to compare"
    gap = (both.public - both.valid_logloss).astype(float)
    verdict = ("the folds rank runs as the leaderboard does" if rho >= 0.7 else
               "the folds and the leaderboard disagree: check the split (boats, class mix) before trusting either" if rho < 0.3 else
               "the folds rank runs roughly as the leaderboard does")
    return (f"{len(both)} scored submissions: Spearman rank correlation of out-of-fold and public log loss {rho:+.2f} "
            f"({verdict}); public minus out of fold {gap.mean():+.4f} on average ({gap.min():+.4f} to {gap.max():+.4f})")


def table_cells(table: pd.DataFrame) -> list[list]:
    def cell(column, value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:+.4f}" if column == "public_minus_valid" else f"{value:.4f}"
        return value

    return [[cell(column, value) for column, value in zip(COLUMNS, row)] for row in table.itertuples(index=False)]


def show_scores(work: Path, fmt: str = "table") -> None:
    """`fishcomp lb`'s table and, for people, the agreement in words."""
    from fishcomp.console import info, table

    frame = scores(work)
    if frame.empty:
        info(f"no leaderboard scores recorded in {work}: `fishcomp lb SUBMISSION SCORE`, or `fishcomp lb --pull` after `--kaggle` uploads")
        return
    table(COLUMNS, table_cells(frame), title=f"{len(frame)} submissions on the leaderboard, from {work}", fmt=fmt)
    said = agreement(frame)
    if said is not None and fmt == "table":
        info(said)
