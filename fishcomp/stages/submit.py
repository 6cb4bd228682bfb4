"""Stage 4: clip, write the CSV in the sample submission's order, validate it, score it if we can.

Artifact (`<work>/submit/<name>-<key>/`): `submission_stg1.csv` (and `submission_stg2.csv`, whose
rows are the stage-1 images then `test_stg2/...`), `summary.json`. The file the user asked for
(`--out`) is a copy written atomically.
"""

from __future__ import annotations

import gzip as gzip_module
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact, file_digest, write_atomic
from fishcomp.config import ClipConfig, LoadedConfig, SubmitConfig, key_payload
from fishcomp.console import info
from fishcomp.context import Context
from fishcomp.data.layout import SOLUTION_FILE, TEST_SPLITS, sample_submission_path
from fishcomp.errors import FishcompError
from fishcomp.graph import Node, Resolver, Stage, register_stage
from fishcomp.metrics import do_clip, eps_clip, log_loss
from fishcomp.predictions import predictions_stage, read_predictions
from fishcomp.submission import read_submission, score_submission, validate_submission

# Bumped when the written files change for the same inputs (2: every clip renormalises its rows),
# so a cached submission of the old format is not reused.
FORMAT = 2


def apply_clip(probs: np.ndarray, clip: ClipConfig) -> np.ndarray:
    if clip.kind == "auto":
        raise ValueError("resolve `auto` with tune_clip first")
    if clip.kind == "do_clip":
        return do_clip(probs, clip.mx)
    if clip.kind == "eps":
        return eps_clip(probs, clip.eps)
    return np.asarray(probs, dtype=np.float64)


def tune_clip(labels: np.ndarray, probs: np.ndarray) -> ClipConfig:
    """The clip (none, the lesson's do_clip over mx, or eps-clip over eps) with the lowest log loss
    on these predictions. Including `none` means the result is never worse than not clipping."""
    from scipy.optimize import minimize_scalar

    def score(clip: ClipConfig) -> float:
        return log_loss(labels, apply_clip(probs, clip))

    candidates = [ClipConfig(kind="none")]
    # A coarse grid finds the basin, a bounded 1-D search refines it.
    for kind, field, grid in (("do_clip", "mx", np.linspace(0.5, 1.0, 26)), ("eps", "eps", np.geomspace(1e-5, 0.2, 26))):
        values = [score(ClipConfig(kind=kind, **{field: v})) for v in grid]
        i = int(np.argmin(values))
        low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        candidates.append(ClipConfig(kind=kind, **{field: float(grid[i])}))
        if high > low:
            found = minimize_scalar(lambda v: score(ClipConfig(kind=kind, **{field: v})), bounds=(low, high), method="bounded")
            candidates.append(ClipConfig(kind=kind, **{field: float(found.x)}))
    return min(candidates, key=score)


def describe_clip(clip: ClipConfig) -> str:
    return {"none": "none", "do_clip": f"do_clip mx={clip.mx:.4f}", "eps": f"eps={clip.eps:.5f}"}.get(clip.kind, clip.kind)


def _file_digest_or_none(path: Path) -> str | None:
    return file_digest(path) if path.is_file() else None


def output_paths(out: Path, files: list[str], gzip: bool = False) -> dict[str, Path]:
    """Where each submission file of the artifact is copied: `--out` for stage 1, `<out>_stg2` for
    stage 2; with gzip, `.csv.gz` (Kaggle accepts it and it uploads ten times faster)."""
    stem = out.name.removesuffix(".gz").removesuffix(".csv") if out.name.endswith((".csv", ".csv.gz")) else out.stem
    suffix = ".csv.gz" if gzip else ".csv"
    names = {"submission_stg1.csv": f"{stem}{suffix}", "submission_stg2.csv": f"{stem}_stg2{suffix}"}
    return {name: out.with_name(names[name]) for name in files}


@register_stage
class Submit(Stage):
    name = "submit"
    declares = ("submit",)
    summary = "the clipped submission CSVs in the sample submission's order, validated"
    saves_config = True

    def inputs(self, resolver: Resolver, loaded: LoadedConfig, **request) -> dict:
        return {"predictions": resolver.node(predictions_stage(loaded.config, calibrated=True), loaded)}

    def params(self, ctx: Context, loaded: LoadedConfig, **request) -> dict:
        config = loaded.config.submit or SubmitConfig()
        samples = [_file_digest_or_none(sample_submission_path(ctx.dataset().root, split)) for split in TEST_SPLITS]
        return {"submit": key_payload(config), "samples": samples, "format": FORMAT}

    def build(self, ctx: Context, node: Node, inputs: dict, tmp: Path) -> dict | None:
        return _build(ctx, node.loaded.config.submit or SubmitConfig(), inputs["predictions"], tmp)

    def describe(self, artifact: Artifact) -> str:
        summary = json.loads(artifact.file("summary.json").read_text())
        return f"oof logloss {summary['oof_logloss_raw']:.4f} -> {summary['oof_logloss_clipped']:.4f} after clip ({summary['clip_used']})"


def write_outputs(ctx: Context, artifact: Artifact, out: Path, gzip: bool = False) -> dict[str, Path]:
    """Copy the artifact's submissions to `--out` (atomically), validate the copies, and score
    them when the data has answers."""
    dataset = ctx.dataset()
    summary = json.loads(artifact.file("summary.json").read_text())
    written = output_paths(out, summary["files"], gzip)
    for name, target in written.items():
        data = artifact.file(name).read_bytes()
        write_atomic(target, gzip_module.compress(data, mtime=0) if gzip else data)
        validate_submission(target, dataset.root)
        info(f"wrote {target}")
        solution = dataset.root / SOLUTION_FILE
        if solution.is_file():
            score = score_submission(read_submission(target), solution)
            info(f"log loss of {target} on {solution}: {score:.4f}")
    return written


def kaggle_submit(path: Path, message: str, competition: str) -> None:
    """Upload a validated file with the official `kaggle` CLI; its own error, in one line, if it fails."""
    executable = shutil.which("kaggle")
    if executable is None:
        raise FishcompError("--kaggle needs the kaggle CLI: `pip install kaggle`, then put your API token in ~/.kaggle/kaggle.json")
    has_token = (Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json").is_file()
    if not has_token and not (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        raise FishcompError(
            "--kaggle: no Kaggle API token; download it from kaggle.com > Settings > API into ~/.kaggle/kaggle.json "
            "(or set KAGGLE_USERNAME and KAGGLE_KEY)"
        )
    command = [executable, "competitions", "submit", "-c", competition, "-f", str(path), "-m", message]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or [f"exit code {result.returncode}"]
        raise FishcompError(f"kaggle competitions submit failed: {lines[-1]}")
    info(f"submitted {path} to {competition}: {(result.stdout.strip().splitlines() or ['ok'])[-1]}")


def _build(ctx: Context, config: SubmitConfig, upstream: Artifact, tmp: Path) -> dict:
    dataset = ctx.dataset()
    predictions = read_predictions(upstream)
    if predictions.classes != dataset.classes:
        raise FishcompError(f"predictions are for classes {predictions.classes}, the data has {dataset.classes}")
    available = pd.concat(list(predictions.tests.values())).set_index("image")
    oof_raw = predictions.oof_probs()
    # `auto` is resolved here, on the out-of-fold predictions, and the choice is recorded.
    clip = tune_clip(predictions.oof_labels(), oof_raw) if config.clip.kind == "auto" else config.clip
    files = []
    for split in dataset.test_splits():
        rows = dataset.submission_rows(split)
        missing = [row for row in rows if row not in available.index]
        if missing:
            raise FishcompError(f"no prediction for {len(missing)} row(s) of the {split} submission, e.g. {missing[0]}")
        probs = apply_clip(available.loc[rows, dataset.classes].to_numpy(dtype=np.float64), clip)
        frame = pd.DataFrame(probs, columns=dataset.classes)
        frame.insert(0, "image", rows)
        name = f"submission_{split.removeprefix('test_')}.csv"
        frame.to_csv(tmp / name, index=False, float_format="%.6f")
        validate_submission(tmp / name, dataset.root)
        files.append(name)
    summary = {
        "files": files,
        "clip": key_payload(config.clip),
        "clip_used": describe_clip(clip),
        "clip_resolved": key_payload(clip),
        "oof_logloss_raw": log_loss(predictions.oof_labels(), oof_raw),
        "oof_logloss_clipped": log_loss(predictions.oof_labels(), apply_clip(oof_raw, clip)),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary}
