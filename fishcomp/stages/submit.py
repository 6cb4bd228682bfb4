"""Stage 4: clip, write the CSV in the sample submission's order, validate it, score it if we can.

Artifact (`<work>/submit/<name>-<key>/`): `submission_stg1.csv` (and `submission_stg2.csv`, whose
rows are the stage-1 images then `test_stg2/...`), `summary.json`. The file the user asked for
(`--out`) is a copy written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact, write_atomic
from fishcomp.config import ClipConfig, LoadedConfig, SubmitConfig, cache_key, key_payload
from fishcomp.console import info, stage_line
from fishcomp.data.layout import SOLUTION_FILE, TEST_SPLITS, sample_submission_path
from fishcomp.errors import FishcompError
from fishcomp.metrics import do_clip, eps_clip, log_loss
from fishcomp.stages.context import Context
from fishcomp.stages.predictions import read_predictions
from fishcomp.stages.validate import read_submission, score_submission, validate_submission

STAGE = "submit"


def apply_clip(probs: np.ndarray, clip: ClipConfig) -> np.ndarray:
    if clip.kind == "do_clip":
        return do_clip(probs, clip.mx)
    if clip.kind == "eps":
        return eps_clip(probs, clip.eps)
    return np.asarray(probs, dtype=np.float64)


def _upstream(ctx: Context, loaded: LoadedConfig) -> Artifact:
    from fishcomp.stages.ensemble import ensure_ensemble
    from fishcomp.stages.train import ensure_train

    return ensure_ensemble(ctx, loaded) if loaded.config.ensemble is not None else ensure_train(ctx, loaded)


def _file_digest_or_none(path: Path) -> str | None:
    from fishcomp.cache import file_digest

    return file_digest(path) if path.is_file() else None


def ensure_submit(ctx: Context, loaded: LoadedConfig, out: Path | None = None) -> Artifact:
    config = loaded.config.submit or SubmitConfig()
    upstream = _upstream(ctx, loaded)
    dataset = ctx.dataset()
    samples = [_file_digest_or_none(sample_submission_path(dataset.root, split)) for split in TEST_SPLITS]
    key = cache_key(STAGE, upstream.key, key_payload(config), samples)
    artifact = ctx.cache.ensure(STAGE, loaded.name, key, lambda tmp: _build(ctx, config, upstream, tmp))
    summary = json.loads(artifact.file("summary.json").read_text())
    stage_line(
        STAGE, artifact.built, artifact.path,
        f"oof logloss {summary['oof_logloss_raw']:.4f} -> {summary['oof_logloss_clipped']:.4f} after clip ({config.clip.kind})",
    )
    if out is not None:
        for name in summary["files"]:
            target = out if name == "submission_stg1.csv" else out.with_name(f"{out.stem}_stg2{out.suffix}")
            write_atomic(target, artifact.file(name).read_bytes())
            info(f"wrote {target}")
            solution = dataset.root / SOLUTION_FILE
            if solution.is_file():
                score = score_submission(read_submission(target), solution)
                info(f"log loss of {target} on {solution}: {score:.4f}")
    return artifact


def _build(ctx: Context, config: SubmitConfig, upstream: Artifact, tmp: Path) -> dict:
    dataset = ctx.dataset()
    predictions = read_predictions(upstream)
    if predictions.classes != dataset.classes:
        raise FishcompError(f"predictions are for classes {predictions.classes}, the data has {dataset.classes}")
    available = pd.concat(list(predictions.tests.values())).set_index("image")
    files = []
    for split in dataset.test_splits():
        rows = dataset.submission_rows(split)
        missing = [row for row in rows if row not in available.index]
        if missing:
            raise FishcompError(f"no prediction for {len(missing)} row(s) of the {split} submission, e.g. {missing[0]}")
        probs = apply_clip(available.loc[rows, dataset.classes].to_numpy(dtype=np.float64), config.clip)
        frame = pd.DataFrame(probs, columns=dataset.classes)
        frame.insert(0, "image", rows)
        name = f"submission_{split.removeprefix('test_')}.csv"
        frame.to_csv(tmp / name, index=False, float_format="%.6f")
        validate_submission(tmp / name, dataset.root)
        files.append(name)
    oof_raw = predictions.oof_probs()
    summary = {
        "files": files,
        "clip": key_payload(config.clip),
        "oof_logloss_raw": log_loss(predictions.oof_labels(), oof_raw),
        "oof_logloss_clipped": log_loss(predictions.oof_labels(), apply_clip(oof_raw, config.clip)),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary}

