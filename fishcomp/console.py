"""Terminal output: what a stage did, warnings, and progress bars (rich, which Typer ships)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Status lines go to stdout so they can be piped; warnings and progress to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _speaks() -> bool:
    # Under torchrun every rank runs the same command; rank 0 speaks for all of them.
    return int(os.environ.get("RANK", 0)) == 0


def info(message: str) -> None:
    if _speaks():
        out.print(message, markup=False)


def warn(message: str) -> None:
    if _speaks():
        err.print(f"warning: {message}", markup=False, style="yellow")


def stage_line(stage: str, built: bool, path: object, detail: str = "") -> None:
    verb = "built  " if built else "cached "
    info(f"{stage:<10} {verb} {path}{'  ' + detail if detail else ''}")


@contextmanager
def progress(description: str, total: int):
    """A progress bar on stderr; silent when FISHCOMP_NO_PROGRESS is set or stderr is not a terminal."""
    quiet = bool(os.environ.get("FISHCOMP_NO_PROGRESS")) or not sys.stderr.isatty() or not _speaks()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, note="")

        def advance(steps: int = 1, note: str | None = None) -> None:
            bar.update(task, advance=steps, **({"note": note} if note is not None else {}))

        yield advance


def table(columns: list[str], rows: list[list], title: str | None = None, fmt: str = "table", caption: str | None = None) -> None:
    """Rows on stdout: a rich table (`table`, with `caption` under it), or `csv` / `json` for
    scripts and spreadsheets."""
    if not _speaks():
        return
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return
    if fmt == "json":
        import json

        print(json.dumps([dict(zip(columns, row)) for row in rows], indent=2, default=str))
        return
    from rich.table import Table

    # At least as wide as its title, which a narrower table would wrap mid-sentence.
    drawn = Table(title=title, caption=caption, caption_justify="left", header_style="bold", min_width=len(title) + 2 if title else None)
    for column in columns:
        drawn.add_column(column)
    for row in rows:
        drawn.add_row(*["" if cell is None else str(cell) for cell in row])
    # Piped output has no terminal width to fit: keep each row on one line.
    (out if out.is_terminal else Console(highlight=False, width=max(160, sum(len(c) + 3 for c in columns) + 200))).print(drawn)
