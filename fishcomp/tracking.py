"""Optional experiment tracking with MLflow: each artifact a run builds, logged as an MLflow run.

Off unless asked for (a `tracking:` section, or `--track`). MLflow is an optional extra
(`pip install fishcomp[track]`, which brings `mlflow-skinny`). The default store is a local
folder, `<work>/mlruns` (MLflow's file store, which needs MLFLOW_ALLOW_FILE_STORE=true since
MLflow 3; set here for that store only); any tracking URI (a server, a database) works instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import TrackingConfig, dump_yaml, flatten_config
from fishcomp.errors import FishcompError

TRACKED_STAGES = ("train", "ensemble", "calibrate", "submit")


def tracking_uri(settings: TrackingConfig, work: Path) -> str:
    if settings.uri:
        return settings.uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(work).resolve() / "mlruns").as_uri()


def track(settings: TrackingConfig, work: Path, stage: str, name: str, config: dict, artifact: Artifact) -> str:
    """Log one finished artifact as an MLflow run; returns the run id."""
    try:
        import mlflow
    except ImportError as exc:
        raise FishcompError("tracking needs MLflow: pip install 'fishcomp[track]' (or mlflow-skinny), or remove `tracking:` / --track") from exc
    mlflow.set_tracking_uri(tracking_uri(settings, work))
    mlflow.set_experiment(settings.experiment)
    summary = json.loads(artifact.file("summary.json").read_text()) if artifact.file("summary.json").is_file() else {}
    with mlflow.start_run(run_name=f"{name}-{stage}-{artifact.key}") as run:
        manifest = json.loads(artifact.file("manifest.json").read_text())
        mlflow.set_tags({"fishcomp.stage": stage, "fishcomp.key": artifact.key, "fishcomp.artifact": str(artifact.path),
                         **({"fishcomp.machine": manifest["machine"]} if manifest.get("machine") else {})})
        params = flatten_config(config)
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(list(params.items())[start : start + 100]))
        metrics = artifact.file("metrics.csv")
        if metrics.is_file():
            for row in pd.read_csv(metrics).to_dict("records"):
                for column in ("train_loss", "valid_loss", "valid_logloss", "valid_accuracy", "inner_logloss"):
                    if column in row and pd.notna(row[column]):
                        mlflow.log_metric(f"fold{int(row['fold'])}.{column}", float(row[column]), step=int(row["epoch"]))
        finals = {k: summary.get(k) for k in ("valid_logloss", "valid_accuracy", "valid_logloss_cross_fitted", "oof_logloss_clipped", "temperature")}
        mlflow.log_metrics({k: float(v) for k, v in finals.items() if isinstance(v, (int, float))})
        for name_ in ("summary.json", "metrics.csv", "config.yaml"):
            if artifact.file(name_).is_file():
                mlflow.log_artifact(str(artifact.file(name_)))
        if not artifact.file("config.yaml").is_file():
            mlflow.log_text(dump_yaml(config), "config.yaml")
        return run.info.run_id
