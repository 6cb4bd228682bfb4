"""The `fishcomp` command line: parses options and calls the stage functions; nothing else.

User errors (bad data, bad config) end with one line on stderr and exit code 2; `--debug`
anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import signal
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from fishcomp.errors import FishcompError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Kaggle image competition pipeline: synth -> precompute -> train -> ensemble -> submit.",
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (see configs/).")]
DataOpt = Annotated[Path, typer.Option("--data", help="Dataset folder in the competition's layout.")]
WorkOpt = Annotated[Path, typer.Option("--work", help="Artifact cache folder.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a config value: --set train.batch_size=32 (repeatable).")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Where to write the stage-1 submission CSV.")]


class OnBadTest(str, Enum):
    fail = "fail"
    prior = "prior"


BadTestOpt = Annotated[
    OnBadTest, typer.Option("--on-bad-test", help="An unreadable test image: fail, or predict the class prior for it.")
]


def _context(data: Path, work: Path, overrides: list[str] | None, on_bad_test: str = "fail"):
    from fishcomp.stages.context import Context

    return Context(data_dir=data, work_dir=work, overrides=list(overrides or []), on_bad_test=OnBadTest(on_bad_test).value)


def _load(config: Path, overrides: list[str] | None):
    from fishcomp.config import load_config

    return load_config(config, overrides)


@app.command("synth")
def synth_cli(
    directory: Annotated[Path, typer.Argument(help="Folder to create the dataset in.")],
    n_train: Annotated[int, typer.Option("--n-train", min=16)] = 1000,
    n_test: Annotated[int, typer.Option("--n-test", min=1)] = 300,
    n_stage2: Annotated[int, typer.Option("--n-stage2", min=0)] = 0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    scale: Annotated[float, typer.Option("--scale", min=0.05, max=2.0, help="Image size factor (1 = real camera sizes).")] = 1.0,
) -> None:
    """Write a synthetic dataset in the competition's exact layout (answers in solution.csv)."""
    from fishcomp.console import info, progress
    from fishcomp.data.synth import synthesize

    if (directory / "train").exists():
        raise FishcompError(f"{directory}/train already exists; choose an empty folder or delete it first")
    with progress("synth", n_train + n_test + n_stage2) as advance:
        counts = synthesize(directory, n_train=n_train, n_test=n_test, n_stage2=n_stage2, seed=seed, scale=scale, on_image=advance)
    info(f"synth      wrote   {directory} ({', '.join(f'{k} {v}' for k, v in counts.items() if v)})")


@app.command("check")
def check_cli(data: DataOpt = Path("data")) -> None:
    """Validate the data layout and annotations; print counts, size x class table, box coverage."""
    from fishcomp.console import info
    from fishcomp.stages.check import check, format_report

    info(format_report(check(_context(data, Path("artifacts"), None))))


@app.command("precompute")
def precompute_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None,
    on_bad_test: BadTestOpt = OnBadTest.fail,
) -> None:
    """Compute (or find cached) backbone features for every model the config names."""
    from fishcomp.config import member_configs
    from fishcomp.stages.precompute import ensure_precompute

    loaded, ctx = _load(config, overrides), _context(data, work, overrides, on_bad_test)
    for member in member_configs(loaded) or [loaded]:
        ensure_precompute(ctx, member)


@app.command("train")
def train_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None,
    on_bad_test: BadTestOpt = OnBadTest.fail,
) -> None:
    """Train the head(s) the config names, building their features first if needed."""
    from fishcomp.config import member_configs
    from fishcomp.stages.train import ensure_train

    loaded, ctx = _load(config, overrides), _context(data, work, overrides, on_bad_test)
    members = member_configs(loaded)
    if not members:
        raise FishcompError(f"{config}: nothing to train (no `head:` section and no ensemble members)")
    for member in members:
        ensure_train(ctx, member)


@app.command("ensemble")
def ensemble_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None,
    on_bad_test: BadTestOpt = OnBadTest.fail,
) -> None:
    """Blend the members the config lists (training them first if needed)."""
    from fishcomp.stages.ensemble import ensure_ensemble

    ensure_ensemble(_context(data, work, overrides, on_bad_test), _load(config, overrides))


GzipOpt = Annotated[bool, typer.Option("--gzip", help="Write the submission(s) as .csv.gz.")]


@app.command("submit")
def submit_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"),
    out: OutOpt = Path("submission.csv"), overrides: SetOpt = None, gzip: GzipOpt = False, on_bad_test: BadTestOpt = OnBadTest.fail,
    kaggle: Annotated[bool, typer.Option("--kaggle", help="Upload with the kaggle CLI after validating (stage 2 when present).")] = False,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Kaggle submission message.")] = None,
) -> None:
    """Clip, write and validate the submission CSV (stage 2 too when test_stg2/ exists)."""
    from fishcomp.config import SubmitConfig
    from fishcomp.stages.submit import ensure_submit, kaggle_submit, output_paths

    if message is not None and not kaggle:
        raise FishcompError("--message is the Kaggle submission message; add --kaggle to upload")
    loaded = _load(config, overrides)
    artifact = ensure_submit(_context(data, work, overrides, on_bad_test), loaded, out, gzip=gzip)
    if kaggle:
        import json

        files = output_paths(out, json.loads(artifact.file("summary.json").read_text())["files"], gzip)
        upload = files.get("submission_stg2.csv", files["submission_stg1.csv"])
        settings = loaded.config.submit or SubmitConfig()
        kaggle_submit(upload, message or f"fishcomp {loaded.name} {artifact.key}", settings.competition)


@app.command("run")
def run_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"),
    out: OutOpt = Path("submission.csv"), overrides: SetOpt = None, gzip: GzipOpt = False, on_bad_test: BadTestOpt = OnBadTest.fail,
) -> None:
    """Run every stage the config names, in order, skipping those already cached."""
    from fishcomp.pipeline import run

    run(_context(data, work, overrides, on_bad_test), _load(config, overrides), out, gzip=gzip)


@app.command("heatmap")
def heatmap_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"),
    split: Annotated[str, typer.Option("--split", help="valid (out-of-fold maps), test_stg1 or test_stg2.")] = "valid",
    images: Annotated[Optional[list[str]], typer.Option("--image", help="An image file name to draw (repeatable).")] = None,
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many images, when none are named.")] = 8,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the PNGs [default: heatmaps/<run name>].")] = None,
    overrides: SetOpt = None,
) -> None:
    """Write PNG overlays of a class-map head's heatmaps (fcn, inception) on the original photos."""
    from fishcomp.stages.heatmap import heatmaps

    loaded = _load(config, overrides)
    heatmaps(_context(data, work, overrides, "prior"), loaded, split, list(images or []), count, out or Path("heatmaps") / loaded.name)


@app.command("report")
def report_cli(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Config files or artifact folders of train/ensemble runs.")] = None,
    data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"),
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html and the PNGs.")] = Path("reports"),
    overrides: SetOpt = None,
) -> None:
    """Write PNG figures and an index.html: curves, confusion, top losses, boxes, heatmaps, leakage."""
    from fishcomp.stages.report import report

    report(_context(data, work, overrides, "prior"), list(runs or []), out)


scratch_app = typer.Typer(no_args_is_help=True, help="Recurrent nets from first principles (NumPy, hand-written backward pass).")
app.add_typer(scratch_app, name="scratch")
CellOpt = Annotated[str, typer.Option("--cell", help="rnn or gru.")]


@scratch_app.command("gradcheck")
def scratch_gradcheck_cli(cell: Annotated[Optional[str], typer.Option("--cell", help="rnn or gru (default: both).")] = None) -> None:
    """Compare every hand-written gradient with PyTorch autograd and with finite differences (float64)."""
    from fishcomp.console import info
    from fishcomp.scratch.check import gradcheck
    from fishcomp.scratch.rnn import CELLS

    if cell is not None and cell not in CELLS:
        raise FishcompError(f"--cell {cell}: choose rnn or gru")
    worst = 0.0
    for name in [cell] if cell else list(CELLS):
        for parameter, (autograd, finite) in gradcheck(name).items():
            info(f"{name:4} {parameter:4} max rel error vs autograd {autograd:.2e}, vs finite differences {finite:.2e}")
            worst = max(worst, autograd, finite)
    info(f"max_rel_error={worst:.3e}")


@scratch_app.command("train")
def scratch_train_cli(
    text_file: Annotated[Path, typer.Argument(help="A plain text file to learn from.")],
    cell: CellOpt = "gru",
    hidden: Annotated[int, typer.Option("--hidden", min=1)] = 128,
    seq: Annotated[int, typer.Option("--seq", min=2)] = 32,
    steps: Annotated[int, typer.Option("--steps", min=1)] = 500,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train a character-level language model with the hand-written passes, then print a sample."""
    import math

    from fishcomp.console import info, progress
    from fishcomp.scratch.charlm import train_charlm
    from fishcomp.scratch.rnn import CELLS

    if cell not in CELLS:
        raise FishcompError(f"--cell {cell}: choose rnn or gru")
    if not text_file.is_file():
        raise FishcompError(f"text file not found: {text_file}")
    try:
        text = text_file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise FishcompError(f"{text_file}: {exc.strerror}") from exc
    with progress(f"scratch {cell}", steps) as advance:
        try:
            model, losses = train_charlm(text, cell, hidden, seq, steps, seed=seed, on_step=lambda step, loss: advance(1, note=f"loss {loss:.3f}"))
        except ValueError as exc:
            raise FishcompError(f"{text_file}: {exc}") from exc
    tail = losses[-max(1, steps // 10):]
    info(f"{cell}: loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} (uniform over {len(model.chars)} characters: {math.log(len(model.chars)):.3f})")
    info(model.sample(text[:seq // 2], 200, seed=seed))


@app.command("validate")
def validate_cli(
    submission: Annotated[Path, typer.Argument(help="Submission CSV to check.")],
    data: DataOpt = Path("data"),
) -> None:
    """Check a submission's header, rows and values; score it when the data has answers."""
    from fishcomp.console import info
    from fishcomp.data.layout import SOLUTION_FILE
    from fishcomp.stages.validate import read_submission, score_submission, validate_submission

    result = validate_submission(submission, data)
    info(f"{submission}: valid {result['stage']} submission, {result['rows']} rows")
    solution = data / SOLUTION_FILE
    if solution.is_file():
        info(f"log loss on {solution}: {score_submission(read_submission(submission), solution):.4f}")


INTERRUPTED = "interrupted; finished artifacts are kept, the unfinished one was discarded (run again to redo it)"


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's kill, `timeout`) unwinds like Ctrl-C, so the artifact being built is
    discarded cleanly instead of the process dying mid-write."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker thread)
        pass


def _split_nproc(args: list[str]) -> tuple[int, list[str]]:
    """`--nproc N` (this same command under torchrun with N processes): N and the other arguments."""
    if "--nproc" not in args:
        return 1, args
    at = args.index("--nproc")
    try:
        count = int(args[at + 1])
    except (IndexError, ValueError):
        raise FishcompError("--nproc needs a number of processes, e.g. --nproc 2") from None
    if count < 1:
        raise FishcompError("--nproc must be at least 1")
    return count, args[:at] + args[at + 2 :]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        count, args = _split_nproc(args)
    except FishcompError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if count > 1:
        import subprocess

        # torchrun itself: rendezvous, one process per rank, and all stopped when one fails.
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}"]
        sys.exit(subprocess.call([*launcher, "-m", "fishcomp", *args]))
    main_inner(args)


def main_inner(args: list[str]) -> None:
    _stop_on_sigterm()
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        from fishcomp.distributed import setup

        setup()
        code = app(args=args, prog_name="fishcomp", standalone_mode=False)
    except FishcompError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        # Usage errors: Typer may ship its own copy of click, so match click's exception protocol.
        if isinstance(exc, click.exceptions.Abort) or type(exc).__name__ == "Abort":
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(130)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:  # Typer turns Ctrl-C (and our SIGTERM) into a silent 130 when not standalone
        print(INTERRUPTED, file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
