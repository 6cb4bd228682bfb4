"""`fishcomp run`: the last stage a config names pulls in everything upstream of it.

Each `ensure_*` builds its inputs first, so asking for the deepest stage runs the whole chain,
and every stage already in the cache is reported as cached and not recomputed.
"""

from __future__ import annotations

from pathlib import Path

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, member_configs
from fishcomp.errors import FishcompError
from fishcomp.stages.context import Context


def run(ctx: Context, loaded: LoadedConfig, out: Path | None, gzip: bool = False) -> Artifact:
    from fishcomp.stages.ensemble import ensure_ensemble
    from fishcomp.stages.precompute import ensure_precompute
    from fishcomp.stages.submit import ensure_submit
    from fishcomp.stages.train import ensure_train

    config = loaded.config
    if config.submit is not None:
        return ensure_submit(ctx, loaded, out, gzip=gzip)
    if config.ensemble is not None:
        return ensure_ensemble(ctx, loaded)
    if config.trains:
        return ensure_train(ctx, loaded)
    if member_configs(loaded):
        raise FishcompError(f"{loaded.path}: nothing to run")
    return ensure_precompute(ctx, loaded)
