"""`fishcomp cache ls|du|gc`: what the artifact cache holds, its size, and removing what no named
config reaches (at real scale one 360x640 map set is about 10 GB)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fishcomp.cache import MANIFEST, damage
from fishcomp.config import LoadedConfig
from fishcomp.console import info
from fishcomp.context import Context


@dataclass
class CachedArtifact:
    stage: str
    label: str
    key: str
    path: Path
    bytes: int
    created: str
    status: str  # whole, damaged, unfinished (a temporary folder) or resumable (a stopped build's finished part)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_artifacts(work: Path) -> list[CachedArtifact]:
    """Every artifact folder of a registered stage. The work folder also holds what is not the
    cache's (the MLflow store `mlruns/`, `leaderboard.csv`): never listed, never collected."""
    import fishcomp.stages  # noqa: F401  (registers every stage)
    from fishcomp.graph import list_stages

    found = []
    stage_dirs = [work / stage for stage in sorted(list_stages())]
    for stage_dir in [d for d in stage_dirs if d.is_dir()]:
        for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            # .tmp-: a build in progress or interrupted; .resume-: what an interrupted one finished (folds, photos).
            unfinished, resumable = folder.name.startswith(".tmp-"), folder.name.startswith(".resume-")
            label, _, key = folder.name.removeprefix(".tmp-").removeprefix(".resume-").rpartition("-")
            reason = None if unfinished or resumable else damage(folder)
            manifest = folder / MANIFEST
            created = json.loads(manifest.read_text()).get("created", "") if reason is None and manifest.is_file() else ""
            status = "unfinished" if unfinished else "resumable" if resumable else "whole" if reason is None else f"damaged ({reason})"
            found.append(CachedArtifact(stage_dir.name, label, key, folder, _size(folder), created, status))
    return found


def collect_garbage(ctx: Context, keep: list[LoadedConfig], dry_run: bool = False) -> list[CachedArtifact]:
    """Remove every artifact no `keep` config reaches (each config's whole graph, as `run` would
    build it), every unfinished temporary folder, and stale lock files. A submission `fishcomp lb`
    recorded (scored, or uploaded with `--kaggle`) stays: it is the competitor's record of what
    scored what, and takes kilobytes. A stopped build's finished folds or photos stay where a
    kept config reaches it and it is not built yet: the next run goes on from them (an hour of a
    backbone pass, say)."""
    from fishcomp.commands.leaderboard import read_ledger
    from fishcomp.pipeline import resolver

    plan = resolver(ctx)
    wanted = {(node.stage.name, node.key) for loaded in keep for node in plan.walk(plan.target(loaded))}
    scored = {("submit", key) for key in read_ledger(ctx.work_dir).key}
    listed = list_artifacts(ctx.work_dir)
    built = {(a.stage, a.key) for a in listed if a.status == "whole"}
    resumed = [a for a in listed if a.status == "resumable" and (a.stage, a.key) in wanted - built]
    doomed = [a for a in listed if ((a.stage, a.key) not in wanted | scored or a.status != "whole") and a not in resumed]
    held = [a for a in listed if (a.stage, a.key) in scored - wanted and a.status == "whole"]
    for artifact in doomed:
        if not dry_run:
            shutil.rmtree(artifact.path, ignore_errors=True)
    freed = sum(a.bytes for a in doomed)
    verb = "would remove" if dry_run else "removed"
    for artifact in doomed:
        info(f"{verb} {artifact.path} ({artifact.bytes / 2**20:.1f} MiB, {artifact.status})")
    also = f" and {len(held)} submission(s) on the leaderboard (fishcomp lb)" if held else ""
    info(f"cache gc: {verb} {len(doomed)} artifact(s), {freed / 2**20:.1f} MiB; kept {len(wanted)} reached by {len(keep)} config(s){also}")
    return doomed
