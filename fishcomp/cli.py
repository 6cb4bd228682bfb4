"""The `fishcomp` command line: each command parses its options and calls one plain function.

User errors (bad data, bad config) end with one line on stderr and exit code 2; `--debug`
anywhere on the line shows the traceback instead; `--nproc N` anywhere runs the command as N
processes under torchrun.
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
    rich_markup_mode=None,
    help="Kaggle image competition pipeline: `fishcomp run -c CONFIG` goes from photos to a validated submission "
    "(precompute -> train -> ensemble -> submit, each stage cached).",
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (see configs/).")]
DataOpt = Annotated[Path, typer.Option("--data", help="Dataset folder in the competition's layout.")]
WorkOpt = Annotated[Path, typer.Option("--work", help="Artifact cache folder.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config value, e.g. train.phases.0.lr=1e-4 (repeatable); "
                 "a comma list (lr=1e-3,3e-4) sweeps every value."),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Where to write the stage-1 submission CSV (stage 2 goes to <out>_stg2.csv).")]
GzipOpt = Annotated[bool, typer.Option("--gzip", help="Write the submission(s) as .csv.gz.")]
# Stripped from the command line before parsing (see main); declared so that --help shows them.
NprocOpt = Annotated[Optional[int], typer.Option("--nproc", metavar="N", help="Run as N processes under torchrun (see README: Scaling out).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error instead of one line.")]
KaggleOpt = Annotated[bool, typer.Option("--kaggle", help="Upload the validated file with the kaggle CLI (stage 2 when present).")]
MessageOpt = Annotated[Optional[str], typer.Option("--message", "-m", help="Kaggle submission message (with --kaggle).")]
TrackOpt = Annotated[bool, typer.Option("--track", help="Log every artifact built to MLflow (the config's `tracking:` or a local store in <work>/mlruns).")]
StageOpt = Annotated[
    Optional[str], typer.Option("--stage", help="Stop at this stage of the graph (e.g. train, calibrate) instead of the deepest the config names."),
]


class OnBadTest(str, Enum):
    fail = "fail"
    prior = "prior"


class TableFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


BadTestOpt = Annotated[
    OnBadTest, typer.Option("--on-bad-test", help="An unreadable test image: fail, or predict the class prior for it.")
]
FormatOpt = Annotated[TableFormat, typer.Option("--format", help="table (for people), csv or json (for scripts).")]


def _version(value: bool) -> None:
    if value:
        from fishcomp.version import __version__

        print(f"fishcomp {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Kaggle image competition pipeline."""


def _context(data: Path, work: Path, overrides: list[str] | None, on_bad_test: str = "fail", loaded=None, track: bool = False):
    from fishcomp.config import TrackingConfig
    from fishcomp.context import Context

    tracking = loaded.config.tracking if loaded is not None else None
    if track and tracking is None:
        tracking = TrackingConfig()
    return Context(data_dir=data, work_dir=work, overrides=list(overrides or []), on_bad_test=OnBadTest(on_bad_test).value, tracking=tracking)


def _load(config: Path, overrides: list[str] | None):
    from fishcomp.config import load_config

    return load_config(config, overrides)


def _sweep(overrides: list[str] | None, work: Path, one) -> None:
    """Run `one(overrides)` once, or once per combination of a comma-list sweep, then print the
    runs table of what the sweep made (Hydra's multirun; the cache keeps the runs apart)."""
    from fishcomp.config import expand_sweep
    from fishcomp.console import info

    combinations = expand_sweep(list(overrides or []))
    if len(combinations) == 1:
        one(combinations[0], None)
        return
    keys: set[str] = set()
    for number, combination in enumerate(combinations, 1):
        info(f"sweep {number}/{len(combinations)}: {' '.join(combination)}")
        keys |= {artifact.key for artifact in one(combination, number)}
    _runs_table(work, keys=keys, sort="valid_logloss", title=f"sweep of {len(combinations)} runs")


def _build_swept(config: Path, data: Path, work: Path, overrides, on_bad_test, track: bool, nodes_of) -> None:
    """Build the nodes `nodes_of(plan, loaded)` picks from the config's graph, once per
    combination of a sweep (their dependencies first, cached ones skipped)."""
    from fishcomp.pipeline import announce, resolver

    def one(combination, number):
        loaded = _load(config, combination)
        plan = resolver(_context(data, work, combination, on_bad_test, loaded, track))
        nodes = nodes_of(plan, loaded)
        announce(plan, nodes, loaded.name)
        return [plan.build(node) for node in nodes]

    _sweep(overrides, work, one)


def _runs_table(work: Path, keys: set[str] | None = None, sort: str = "created", fmt: str = "table", title: str | None = None,
                solution: Path | None = None) -> None:
    from fishcomp.commands.runs import collect_runs, columns, has_leaderboard, machine_legend, sort_rows, table_cells
    from fishcomp.console import table

    with_tests = solution is not None
    rows = collect_runs(work, keys, solution)
    with_lb = has_leaderboard(rows)
    # For people, a machine column only where the rows come from several (labelled, with a
    # legend under the table); for scripts, always the full line.
    with_machine = fmt != "table" or machine_legend(rows) is not None
    rows = sort_rows(rows, sort, with_tests, with_lb, with_machine)
    legend = machine_legend(rows) if fmt == "table" else None  # A is the first row's, as the table is sorted
    caption = None if legend is None else "\n".join(f"{label}: {machine}" for machine, label in legend.items())
    table(columns(with_tests, with_lb, with_machine), table_cells(rows, with_tests, with_lb, legend, with_machine),
          title=title or f"{len(rows)} runs in {work}", fmt=fmt, caption=caption)


@app.command("run")
def run_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), out: OutOpt = Path("submission.csv"),
    overrides: SetOpt = None, gzip: GzipOpt = False, on_bad_test: BadTestOpt = OnBadTest.fail, stage: StageOpt = None,
    kaggle: KaggleOpt = False, message: MessageOpt = None, track: TrackOpt = False, nproc: NprocOpt = None, debug: DebugOpt = False,
) -> None:
    """Run every stage the config names, in order, skipping those already cached; validate and write the submission."""
    from fishcomp.pipeline import run

    if message is not None and not kaggle:
        raise FishcompError("--message is the Kaggle submission message; add --kaggle to upload")

    def one(combination, number):
        target = out if number is None else out.with_name(f"{out.stem}-{number}{out.suffix}")
        loaded = _load(config, combination)
        artifact = run(_context(data, work, combination, on_bad_test, loaded, track), loaded, target, gzip=gzip, stage=stage)
        if kaggle:
            _upload(loaded, artifact, target, gzip, message, work)
        return [artifact]

    _sweep(overrides, work, one)


def _upload(loaded, artifact, out: Path, gzip: bool, message: str | None, work: Path) -> None:
    from fishcomp.commands.leaderboard import record
    from fishcomp.config import SubmitConfig
    from fishcomp.console import warn
    from fishcomp.stages.submit import kaggle_submit, output_paths

    if artifact.stage != "submit":
        raise FishcompError(f"--kaggle uploads a submission; {loaded.path} stops at {artifact.stage}")
    import json

    files = output_paths(out, json.loads(artifact.file("summary.json").read_text())["files"], gzip)
    upload = files.get("submission_stg2.csv", files["submission_stg1.csv"])
    message = message or f"fishcomp {loaded.name} {artifact.key}"
    kaggle_submit(upload, message, (loaded.config.submit or SubmitConfig()).competition)
    # Pending until `fishcomp lb --pull` reads Kaggle's score back, matched by this message.
    try:
        record(work, artifact.key, None, note=message, source="upload")
    except FishcompError as exc:  # the upload went through; say so rather than fail after it
        warn(f"uploaded, but not recorded for `fishcomp lb --pull`: {exc}")


@app.command("synth")
def synth_cli(
    directory: Annotated[Path, typer.Argument(help="Folder to create the dataset in.")],
    n_train: Annotated[int, typer.Option("--n-train", min=16, help="Train images.")] = 1000,
    n_test: Annotated[int, typer.Option("--n-test", min=1, help="Stage-1 test images.")] = 300,
    n_stage2: Annotated[int, typer.Option("--n-stage2", min=0, help="Stage-2 test images, from boats never seen in train.")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Everything drawn follows from it.")] = 0,
    scale: Annotated[float, typer.Option("--scale", min=0.05, max=2.0, help="Image size factor (1 = real camera sizes).")] = 1.0,
    style: Annotated[str, typer.Option("--style", help="classic, hard, easy, wild (shapes, camera heights, light and white balance the others hold fixed), sloppy (classic photos, loose and missing train boxes), or mixed (drawn from the seed between easy and hard).")] = "classic",
    debug: DebugOpt = False,
) -> None:
    """Write a synthetic dataset in the competition's exact layout (answers in solution.csv)."""
    from fishcomp.console import info, progress
    from fishcomp.data.synth import synthesize

    if (directory / "train").exists():
        raise FishcompError(f"{directory}/train already exists; choose an empty folder or delete it first")
    from fishcomp.data.synth import style_for

    style_for(style, seed)  # an unknown style is an error before anything is written
    with progress("synth", n_train + n_test + n_stage2) as advance:
        counts = synthesize(directory, n_train=n_train, n_test=n_test, n_stage2=n_stage2, seed=seed, scale=scale, on_image=advance, style=style)
    info(f"synth      wrote   {directory} ({', '.join(f'{k} {v}' for k, v in counts.items() if v)})")


@app.command("check")
def check_cli(data: DataOpt = Path("data"), debug: DebugOpt = False) -> None:
    """Validate the data layout and annotations; print counts, size x class table, box coverage."""
    from fishcomp.commands.check import check, format_report
    from fishcomp.console import info

    info(format_report(check(_context(data, Path("artifacts"), None))))


@app.command("dag")
def dag_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None, stage: StageOpt = None,
    fmt: FormatOpt = TableFormat.table, debug: DebugOpt = False,
) -> None:
    """Print the stage graph `run` would execute (each node's stage, config, key, status, how long it took to build where cached, and how long the last build of the same config took here where not); builds nothing."""
    from fishcomp.console import table
    from fishcomp.pipeline import dag, dag_summary

    rows = dag(_context(data, work, overrides), _load(config, overrides), stage)
    position = {(row.node.stage.name, row.node.key): i for i, row in enumerate(rows, 1)}

    def seconds(value):
        return "" if value is None else f"{value:.1f}"

    table(
        ["#", "stage", "config", "key", "status", "built_s", "last_build_s", "reads"],
        [[i, r.node.stage.name, r.node.name, r.node.key, r.status, seconds(r.built), seconds(r.estimate),
          " ".join(f"{name}:" + ",".join(f"#{position[(n.stage.name, n.key)]}" for n in (value if isinstance(value, list) else [value]))
                   for name, value in r.node.inputs.items())]
         for i, r in enumerate(rows, 1)],
        title=f"{config}: {len(rows)} nodes, {dag_summary(rows)}",
        fmt=fmt.value,
    )


@app.command("config")
def config_cli(config: ConfigOpt, overrides: SetOpt = None, debug: DebugOpt = False) -> None:
    """Print the resolved config (after `extends:`, `--set` and the defaults) as YAML."""
    from fishcomp.config import dump_yaml

    loaded = _load(config, overrides)
    print(dump_yaml({"name": loaded.name, **loaded.config.model_dump(mode="json", exclude={"name"})}), end="")


@app.command("precompute")
def precompute_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None,
    on_bad_test: BadTestOpt = OnBadTest.fail, nproc: NprocOpt = None, debug: DebugOpt = False,
) -> None:
    """Compute (or find cached) backbone features for every model the config names."""
    from fishcomp.pipeline import announce, feature_nodes, resolver

    plan = resolver(_context(data, work, overrides, on_bad_test))
    loaded = _load(config, overrides)
    nodes = feature_nodes(plan, loaded)
    announce(plan, nodes, loaded.name)
    for node in nodes:
        plan.build(node)


@app.command("train")
def train_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None,
    on_bad_test: BadTestOpt = OnBadTest.fail, track: TrackOpt = False, nproc: NprocOpt = None, debug: DebugOpt = False,
) -> None:
    """Train the head(s) the config names, building their features first if needed."""
    from fishcomp.pipeline import train_nodes

    _build_swept(config, data, work, overrides, on_bad_test, track, train_nodes)


@app.command("ensemble")
def ensemble_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None,
    on_bad_test: BadTestOpt = OnBadTest.fail, track: TrackOpt = False, nproc: NprocOpt = None, debug: DebugOpt = False,
) -> None:
    """Blend the members the config lists (training them first if needed)."""
    from fishcomp.pipeline import stage_node

    _build_swept(config, data, work, overrides, on_bad_test, track, lambda plan, loaded: [stage_node(plan, loaded, "ensemble")])


@app.command("submit")
def submit_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"),
    out: OutOpt = Path("submission.csv"), overrides: SetOpt = None, gzip: GzipOpt = False, on_bad_test: BadTestOpt = OnBadTest.fail,
    kaggle: KaggleOpt = False, message: MessageOpt = None, track: TrackOpt = False, nproc: NprocOpt = None, debug: DebugOpt = False,
) -> None:
    """Clip, write and validate the submission CSV (stage 2 too when test_stg2/ exists)."""
    from fishcomp.pipeline import resolver, stage_node
    from fishcomp.stages.submit import write_outputs

    if message is not None and not kaggle:
        raise FishcompError("--message is the Kaggle submission message; add --kaggle to upload")
    loaded = _load(config, overrides)
    ctx = _context(data, work, overrides, on_bad_test, loaded, track)
    plan = resolver(ctx)
    artifact = plan.build(stage_node(plan, loaded, "submit"))
    write_outputs(ctx, artifact, out, gzip)
    if kaggle:
        _upload(loaded, artifact, out, gzip, message, work)


@app.command("runs")
def runs_cli(
    work: WorkOpt = Path("artifacts"),
    sort: Annotated[str, typer.Option("--sort", help="Column to sort by: valid_logloss, cross_fitted, accuracy, seconds, created, name (machine where the runs come from several machines; test_stg1, test_stg2 with --solution; public_lb, private_lb once `fishcomp lb` recorded scores).")] = "created",
    solution: Annotated[Optional[Path], typer.Option("--solution", help="The answers, in the submission's format (a solution the competition released, or synthetic data's solution.csv): adds each run's test_stg1 / test_stg2 log loss.")] = None,
    fmt: FormatOpt = TableFormat.table, debug: DebugOpt = False,
) -> None:
    """Every trained head, blend and submission in the cache, side by side, with the settings that differ."""
    if not work.is_dir():
        raise FishcompError(f"no artifact folder {work}; pass --work, or run something first")
    _runs_table(work, sort=sort, fmt=fmt.value, solution=solution)


@app.command("diff")
def diff_cli(
    run_a: Annotated[str, typer.Argument(metavar="A", help="A run: its key (or the start of it) from `fishcomp runs`, name-key, or its folder; or a submission CSV.")],
    run_b: Annotated[list[str], typer.Argument(metavar="B", help="The run(s) (or submissions) to compare with A, named the same ways; several: one row each.")],
    work: WorkOpt = Path("artifacts"),
    split: Annotated[Optional[str], typer.Option("--split", help="Runs: valid (out of fold, the default), or test_stg1 / test_stg2 scored on the solution. Submissions: one stage's rows only.")] = None,
    data: DataOpt = Path("data"),
    solution: Annotated[Optional[Path], typer.Option("--solution", help="The answers, in the submission's format (a solution the competition released); default DATA/solution.csv.")] = None,
    by: Annotated[str, typer.Option("--by", help="image: resample images; boat: resample whole boats (images of one size, read from --data).")] = "image",
    resamples: Annotated[int, typer.Option("--resamples", help="Bootstrap draws of the images.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap draws.")] = 0,
    fmt: FormatOpt = TableFormat.table, debug: DebugOpt = False,
) -> None:
    """Is B better than A, out of fold (or on a test split with known answers)? Two submission files on a solution, too. Paired per-image differences and their bootstrap interval, overall and per class; several B: one row each."""
    from fishcomp.commands.diff import compare, show_comparison

    show_comparison([compare(run_a, ref, work, split, solution, data, by, resamples, seed) for ref in run_b], fmt.value)


@app.command("lb")
def lb_cli(
    submission: Annotated[Optional[str], typer.Argument(metavar="SUBMISSION", help="A submission file fishcomp wrote (renamed or gzipped, it is found by its content), or its run as `fishcomp runs` lists it.")] = None,
    public: Annotated[Optional[float], typer.Argument(metavar="PUBLIC", help="The public leaderboard log loss Kaggle gave it.")] = None,
    private: Annotated[Optional[float], typer.Option("--private", help="The private leaderboard log loss, once the competition has ended.")] = None,
    note: Annotated[Optional[str], typer.Option("--note", help="Anything to remember about this upload.")] = None,
    pull: Annotated[bool, typer.Option("--pull", help="Read this account's scores with the kaggle CLI and record those of this cache's submissions (matched by the key `--kaggle` puts in the message, or by an upload's message).")] = False,
    competition: Annotated[Optional[str], typer.Option("--competition", help="With --pull: the competition's slug (default: submit.competition's default).")] = None,
    work: WorkOpt = Path("artifacts"), fmt: FormatOpt = TableFormat.table, debug: DebugOpt = False,
) -> None:
    """Leaderboard scores beside the out-of-fold estimates: record one (SUBMISSION PUBLIC), or read them from Kaggle (--pull); then the table and whether the folds rank runs as the leaderboard does."""
    from fishcomp.commands.leaderboard import pulled, record, show_scores
    from fishcomp.config import SubmitConfig
    from fishcomp.console import info

    if not work.is_dir():
        raise FishcompError(f"no artifact folder {work}; pass --work, or run something first")
    if pull and submission is not None:
        raise FishcompError("give either a submission and its score, or --pull, not both")
    if submission is not None and public is None and private is None:
        raise FishcompError(f"give the score Kaggle gave it: fishcomp lb {submission} 0.1234 [--private 0.1234]")
    if submission is not None:
        row = record(work, submission, public, private, note)
        info(f"recorded {row['name']}-{row['key']}: public {row['public']}" + (f", private {row['private']}" if row["private"] is not None else ""))
    elif pull:
        info(pulled(work, competition or SubmitConfig().competition))
    show_scores(work, fmt.value)


@app.command("predict")
def predict_cli(
    config: ConfigOpt,
    images: Annotated[Optional[list[Path]], typer.Argument(help="Photos to classify.")] = None,
    folder: Annotated[Optional[Path], typer.Option("--folder", help="Classify every image in this folder (recursively).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV to write (image, one column per class); default: print a table.")] = None,
    data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None, debug: DebugOpt = False,
) -> None:
    """Class probabilities for any photos, from a trained config's fold models (averaged); a blend or a
    crops head through its finished run's whole graph, calibrated as that run was."""
    from fishcomp.commands.predict import find_images, predict_images
    from fishcomp.console import info, table

    paths = find_images(list(images or []), folder)
    frame = predict_images(_context(data, work, overrides, "prior"), _load(config, overrides), paths)
    if out is not None:
        from fishcomp.cache import write_atomic

        write_atomic(out, frame.to_csv(index=False, float_format="%.6f"))
        info(f"wrote {out} ({len(frame)} images)")
    else:
        classes = list(frame.columns[1:])
        probs = frame[classes].to_numpy(dtype=float)
        table(["image", "predicted", *classes],
              [[image, classes[int(row.argmax())], *[f"{v:.3f}" for v in row]] for image, row in zip(frame.image, probs)])


cache_app = typer.Typer(no_args_is_help=True, help="What the artifact cache holds, its size, and removing what no config needs.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls_cli(work: WorkOpt = Path("artifacts"), fmt: FormatOpt = TableFormat.table, debug: DebugOpt = False) -> None:
    """Every artifact: stage, config, key, size, when built, and whether it is whole."""
    from fishcomp.commands.cache import list_artifacts
    from fishcomp.console import table

    rows = list_artifacts(work)
    table(["stage", "name", "key", "MiB", "created", "status"], [[r.stage, r.label, r.key, f"{r.bytes / 2**20:.1f}", r.created, r.status] for r in rows],
          title=f"{len(rows)} artifacts in {work}", fmt=fmt.value)


@cache_app.command("du")
def cache_du_cli(work: WorkOpt = Path("artifacts"), debug: DebugOpt = False) -> None:
    """Disk use per stage, and in all."""
    from fishcomp.commands.cache import list_artifacts
    from fishcomp.console import table

    rows = list_artifacts(work)
    stages = sorted({r.stage for r in rows})
    sizes = [[s, sum(1 for r in rows if r.stage == s), f"{sum(r.bytes for r in rows if r.stage == s) / 2**20:.1f}"] for s in stages]
    table(["stage", "artifacts", "MiB"], [*sizes, ["total", len(rows), f"{sum(r.bytes for r in rows) / 2**20:.1f}"]])


@cache_app.command("gc")
def cache_gc_cli(
    keep: Annotated[list[Path], typer.Option("--keep", "-c", help="A config whose artifacts stay (repeatable).")],
    data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"), overrides: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Remove every artifact that none of the --keep configs reaches (and unfinished temp folders)."""
    from fishcomp.commands.cache import collect_garbage

    collect_garbage(_context(data, work, overrides), [_load(c, overrides) for c in keep], dry_run)


@app.command("heatmap")
def heatmap_cli(
    config: ConfigOpt, data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"),
    split: Annotated[str, typer.Option("--split", help="valid (out-of-fold maps), test_stg1 or test_stg2.")] = "valid",
    images: Annotated[Optional[list[str]], typer.Option("--image", help="An image file name to draw (repeatable).")] = None,
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many images, when none are named.")] = 8,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the PNGs (default: heatmaps/<run name>).")] = None,
    overrides: SetOpt = None, debug: DebugOpt = False,
) -> None:
    """Write PNG overlays of a class-map head's heatmaps (fcn, inception) on the original photos."""
    from fishcomp.commands.heatmap import heatmaps

    loaded = _load(config, overrides)
    heatmaps(_context(data, work, overrides, "prior"), loaded, split, list(images or []), count, out or Path("heatmaps") / loaded.name)


@app.command("report")
def report_cli(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Config files or artifact folders of train/ensemble runs.")] = None,
    configs: Annotated[Optional[list[str]], typer.Option("--config", "-c", help="A config to report (repeatable; same as a positional RUN).")] = None,
    data: DataOpt = Path("data"), work: WorkOpt = Path("artifacts"),
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html and the PNGs.")] = Path("reports"),
    overrides: SetOpt = None, debug: DebugOpt = False,
) -> None:
    """Write PNG figures and an index.html: curves, confusion, top losses, boxes, heatmaps, leakage."""
    from fishcomp.commands.report import report

    report(_context(data, work, overrides, "prior"), [*(configs or []), *(runs or [])], out)


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
    submission: Annotated[Path, typer.Argument(help="Submission CSV (or .csv.gz) to check.")],
    data: DataOpt = Path("data"), debug: DebugOpt = False,
) -> None:
    """Check a submission's header, rows and values; score it when the data has answers."""
    from fishcomp.console import info
    from fishcomp.data.layout import SOLUTION_FILE
    from fishcomp.submission import (
        read_submission,
        score_submission,
        validate_submission,
    )

    result = validate_submission(submission, data)
    info(f"{submission}: valid {result['stage']} submission, {result['rows']} rows")
    solution = data / SOLUTION_FILE
    if solution.is_file():
        info(f"log loss on {solution}: {score_submission(read_submission(submission), solution):.4f}")


INTERRUPTED = ("interrupted; finished artifacts are kept, and the same command goes on: an unfinished backbone pass or "
               "training where it stopped, any other stage from its start")


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
    if argv is None:
        # This process's own command (the console script, `python -m fishcomp`, a torchrun rank):
        # at exit, Python's last garbage collections walk every object torch, torchvision and
        # timm created on import, about 2 s of a command's time here (0.4 s for one that needs no
        # torch). Frozen, they are left to the operating system; atexit handlers (temporary
        # folders, workers) still run and the standard streams are still flushed. Registered first,
        # so it runs last. Not when called with arguments (tests, notebooks): their process goes on.
        import atexit
        import gc

        atexit.register(gc.freeze)
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
    from fishcomp.allocator import keep_freed_memory

    _stop_on_sigterm()
    keep_freed_memory()
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
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            # Usage errors in the project's one format, with where to look.
            command = getattr(getattr(exc, "ctx", None), "command_path", "fishcomp")
            print(f"error: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
            sys.exit(exc.exit_code)
        raise
    if code == 130:  # Typer turns Ctrl-C (and our SIGTERM) into a silent 130 when not standalone
        print(INTERRUPTED, file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
