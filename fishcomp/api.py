"""The Python API, for notebooks: the CLI's compute commands as functions returning artifacts.

    import fishcomp
    artifact = fishcomp.run("configs/dense.yaml", data="data", work="artifacts", overrides=["split.folds=3"])
    artifact.path                      # the submit artifact's folder
    fishcomp.train("configs/fcn.yaml").file("oof.csv")
    [row.status for row in fishcomp.dag("configs/pipeline.yaml")]
    fishcomp.runs(work="artifacts")    # the runs table as a DataFrame
    fishcomp.diff("44a00ca8", "53107d7f")  # paired B - A, overall and per class, as a DataFrame
    fishcomp.predict("configs/pipeline.yaml", "photos/")  # probabilities for any photos

Every function takes a config path (or a loaded config), `data`, `work` and `overrides` (the
CLI's `--set` values) and goes through the same cached stage graph as the CLI.
"""

from __future__ import annotations

from pathlib import Path

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, load_config
from fishcomp.context import Context


def _prepare(config, data, work, overrides) -> tuple[Context, LoadedConfig]:
    overrides = list(overrides or [])
    loaded = config if isinstance(config, LoadedConfig) else load_config(config, overrides)
    return Context(data_dir=Path(data), work_dir=Path(work), overrides=overrides), loaded


def run(config, data="data", work="artifacts", overrides=None, out=None, stage: str | None = None) -> Artifact:
    """Every stage the config names (or up to `stage`); with `out`, the validated submission copied there."""
    from fishcomp import pipeline

    ctx, loaded = _prepare(config, data, work, overrides)
    return pipeline.run(ctx, loaded, Path(out) if out is not None else None, stage=stage)


def build(stage: str, config, data="data", work="artifacts", overrides=None) -> Artifact:
    """One stage's artifact (`precompute`, `crops`, `train`, `ensemble`, `calibrate`, `submit`)."""
    from fishcomp import pipeline

    ctx, loaded = _prepare(config, data, work, overrides)
    return pipeline.build(ctx, stage, loaded)


def precompute(config, data="data", work="artifacts", overrides=None) -> Artifact:
    """The backbone features a training config reads."""
    from fishcomp import pipeline

    ctx, loaded = _prepare(config, data, work, overrides)
    return pipeline.features(ctx, loaded)


def train(config, data="data", work="artifacts", overrides=None) -> Artifact:
    return build("train", config, data, work, overrides)


def ensemble(config, data="data", work="artifacts", overrides=None) -> Artifact:
    return build("ensemble", config, data, work, overrides)


def submit(config, data="data", work="artifacts", overrides=None, out=None) -> Artifact:
    return run(config, data, work, overrides, out, stage="submit")


def dag(config, data="data", work="artifacts", overrides=None, stage: str | None = None):
    """The nodes `run` would build, with their status (`cached`, `to build`, `to resume`, `to reuse`, `damaged`)."""
    from fishcomp import pipeline

    ctx, loaded = _prepare(config, data, work, overrides)
    return pipeline.dag(ctx, loaded, stage)


def predict(config, images, data="data", work="artifacts", overrides=None):
    """`fishcomp predict` as a pandas DataFrame (image, one probability column per class): the
    photos (paths, or a folder's images) classified by the config's fold models; a blend or a
    crops head through its finished run's graph, calibrated as that run was."""
    from fishcomp.commands.predict import find_images, predict_images

    ctx, loaded = _prepare(config, data, work, overrides)
    images = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    folder = images[0] if len(images) == 1 and images[0].is_dir() else None
    ctx.on_bad_test = "prior"  # as the CLI's: an unreadable test image of the data set does not stop a prediction
    return predict_images(ctx, loaded, find_images([] if folder else images, folder))


def runs(work="artifacts", solution=None):
    """`fishcomp runs` as a pandas DataFrame (numbers as numbers, one row per run, its folder in
    `path`, the machine it was built on in `machine`); with `solution`, each run's test_stg1 /
    test_stg2 log loss on it; where `fishcomp lb` recorded leaderboard scores, each submission's
    public_lb / private_lb."""
    import pandas as pd

    from fishcomp.commands.runs import collect_runs, columns, has_leaderboard

    rows = collect_runs(Path(work), solution=Path(solution) if solution is not None else None)
    return pd.DataFrame(rows, columns=[*columns(solution is not None, has_leaderboard(rows), with_machine=True), "path"])


def diff(a, b, work="artifacts", split: str | None = None, solution=None, data="data", by: str = "image", resamples: int = 2000,
         seed: int = 0):
    """`fishcomp diff A B` as a pandas DataFrame: B - A per scope (all, each stage of a
    submission, each class), its 95 % interval, images each wins and the verdict. A and B: runs of
    `work` (keys, key prefixes, name-key, folders) or two submission files."""
    import pandas as pd

    from fishcomp.commands.diff import compare
    from fishcomp.metrics import difference_verdict

    result = compare(str(a), str(b), Path(work), split, solution, Path(data), by, resamples, seed)
    return pd.DataFrame([{**row, "verdict": difference_verdict(row)} for row in result["rows"]]).set_index("scope")


def leaderboard(work="artifacts"):
    """`fishcomp lb`'s table as a pandas DataFrame: each submission with a recorded leaderboard
    score, its out-of-fold log loss, public and private scores and their gap."""
    from fishcomp.commands.leaderboard import scores

    return scores(Path(work))
