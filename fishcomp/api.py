"""The Python API, for notebooks: the CLI's compute commands as functions returning artifacts.

    import fishcomp
    artifact = fishcomp.run("configs/dense.yaml", data="data", work="artifacts", overrides=["split.folds=3"])
    artifact.path                      # the submit artifact's folder
    fishcomp.train("configs/fcn.yaml").file("oof.csv")
    [row.status for row in fishcomp.dag("configs/pipeline.yaml")]

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
    """The nodes `run` would build, with their status (`cached`, `to build`, `damaged`)."""
    from fishcomp import pipeline

    ctx, loaded = _prepare(config, data, work, overrides)
    return pipeline.dag(ctx, loaded, stage)
