"""The plain functions behind the CLI's compute commands, also the Python API for notebooks.

Each takes a config (a path or a loaded one) and returns the artifact it built or found; the CLI
commands are thin wrappers over these. Everything goes through one `Resolver` per call, so each
artifact is looked up or built once, inputs first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fishcomp.stages  # noqa: F401  (registers every stage)
from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, load_config
from fishcomp.console import info
from fishcomp.context import Context
from fishcomp.distributed import world
from fishcomp.errors import FishcompError
from fishcomp.graph import Node, Resolver, get_stage
from fishcomp.stages.submit import write_outputs
from fishcomp.stages.train import features_request


def resolver(ctx: Context) -> Resolver:
    return Resolver(ctx)


def feature_nodes(plan: Resolver, loaded: LoadedConfig) -> list[Node]:
    """The backbone passes of every model the config names (its members, or itself)."""
    members = plan.members(loaded) or [loaded]
    return [plan.node("precompute", m, **(features_request(m) if m.config.trains else {})) for m in members]


def train_nodes(plan: Resolver, loaded: LoadedConfig) -> list[Node]:
    members = plan.members(loaded)
    if not members:
        raise FishcompError(f"{loaded.path}: nothing to train (no `head:` section and no ensemble members)")
    return [plan.node("train", member) for member in members]


def stage_node(plan: Resolver, loaded: LoadedConfig, stage: str) -> Node:
    """A named stage's node for a config that has that stage's section."""
    section = get_stage(stage).section
    if section is not None and getattr(loaded.config, section) is None:
        raise FishcompError(f"{loaded.path} has no `{section}` section, which the {stage} stage reads")
    return plan.node(stage, loaded)


def target(plan: Resolver, loaded: LoadedConfig, stage: str | None = None) -> Node:
    """The node `run` builds: the deepest stage the config names, or the one asked for."""
    if stage is None:
        return plan.target(loaded)
    return stage_node(plan, loaded, stage)


def run(ctx: Context, loaded: LoadedConfig, out: Path | None = None, gzip: bool = False, stage: str | None = None) -> Artifact:
    """Every stage the config names (or up to `stage`), in order, each cached; with `out`, the
    submission copied there."""
    if loaded.config.tracking is not None and ctx.tracking is None:
        ctx.tracking = loaded.config.tracking
    plan = resolver(ctx)
    goal = target(plan, loaded, stage)
    announce(plan, [goal], loaded.name)
    artifact = plan.build(goal)
    if out is not None and artifact.stage == "submit":
        write_outputs(ctx, artifact, out, gzip)
    return artifact


@dataclass
class DagRow:
    node: Node
    status: str
    # For a node to build: the seconds the last build of its stage and label (config) took in this
    # work folder; None where there was none.
    estimate: float | None = None
    # For a cached node: the seconds its own build took (its manifest's), so that `dag` after a run
    # shows where that run's time went, precompute and crops included.
    built: float | None = None


def dag(ctx: Context, loaded: LoadedConfig, stage: str | None = None) -> list[DagRow]:
    """The nodes `run` would build, inputs first, with their status and, for those to build, how
    long the last build of the same config took here (for those cached, how long theirs took);
    builds nothing."""
    plan = resolver(ctx)
    return _rows(plan, target(plan, loaded, stage))


def _rows(plan: Resolver, goal: Node) -> list[DagRow]:
    rows = []
    for node in plan.walk(goal):
        status = plan.status(node)
        if status == "cached":
            rows.append(DagRow(node, status, built=plan.ctx.cache.seconds(node.stage.name, node.key)))
        elif status == "to reuse":  # a fraction of a full build: the last one says nothing of it
            rows.append(DagRow(node, status))
        else:
            rows.append(DagRow(node, status, estimate=plan.ctx.cache.last_seconds(node.stage.name, node.label)))
    return rows


def dag_summary(rows: list[DagRow]) -> str:
    """`dag`'s title after the node count: what is left to build and about how long it took last
    time, and what is cached and how long that took to build."""
    cached = [row for row in rows if row.status == "cached"]
    timed = [row.built for row in cached if row.built is not None]
    took = f" (built in {_duration(sum(timed))})" if timed else ""
    left = build_estimate(rows)
    if left is None:
        return f"all cached{took}"
    return left + (f"; {len(cached)} cached{took}" if cached else "")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def announce(plan: Resolver, goals: list[Node], name: str) -> None:
    """Before building `goals`: one line with what is left to build and about how long it took
    last time (nothing when all is cached)."""
    rows = {row.node.key: row for goal in goals for row in _rows(plan, goal)}
    if world().is_main and (estimate := build_estimate(list(rows.values()))):
        info(f"plan       {name}: {estimate}")


def build_estimate(rows: list[DagRow]) -> str | None:
    """What is left to build, in words, with the time its earlier builds took; None if nothing."""
    left = [row for row in rows if row.status != "cached"]
    if not left:
        return None
    timed = [row.estimate for row in left if row.estimate is not None]
    reusing = sum(row.status == "to reuse" for row in left)
    what = f"{len(left)} to build" + (f" ({reusing} taking the train part of an earlier build)" if reusing else "")
    if not timed:
        return what + (" (none built in this work folder before, so no estimate)" if not reusing else "")
    return f"{what}, about {_duration(sum(timed))} by this work folder's last builds of {len(timed)} of them"


def load(config: str | Path | LoadedConfig, overrides: list[str] | None = None) -> LoadedConfig:
    return config if isinstance(config, LoadedConfig) else load_config(config, overrides)


def build(ctx: Context, stage: str, loaded: LoadedConfig, **request) -> Artifact:
    """One stage's artifact for a config (its inputs first): `build(ctx, "train", loaded)`."""
    plan = resolver(ctx)
    return plan.build(plan.node(stage, loaded, **request))


def features(ctx: Context, loaded: LoadedConfig) -> Artifact:
    """The features a training config reads (its backbone pass, or its crops)."""
    plan = resolver(ctx)
    return plan.build(plan.node("train", loaded).inputs["features"])
