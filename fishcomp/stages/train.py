"""Stage 2: train a head on the cached features, fold by fold, and predict the test images.

Artifact (`<work>/train/<name>-<key>/`):
- `oof.csv`: image, label, fold, one probability column per class (empty for a never-validated
  image under a hold-out split); the out-of-fold predictions ensembles and clipping are tuned on;
- `test_stg1.csv` (and `test_stg2.csv`): image, probabilities (the folds' models averaged);
- `metrics.csv`: fold, epoch, lr, train_loss, valid_loss, valid_logloss, valid_accuracy;
- `checkpoints/fold<k>.pt`: the best epoch of each fold (by validation log loss);
- `summary.json`, `config.yaml`.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, cache_key, dump_yaml, key_payload
from fishcomp.console import progress, stage_line, warn
from fishcomp.data.splits import assign_folds, fold_count
from fishcomp.errors import FishcompError
from fishcomp.metrics import accuracy, log_loss, prior_log_loss
from fishcomp.models.heads import head_uses_map
from fishcomp.stages.context import Context, resolve_device
from fishcomp.stages.precompute import ensure_precompute, load_features, load_index
from fishcomp.stages.predictions import Predictions

STAGE = "train"


def train_key(precompute_key: str, loaded: LoadedConfig) -> str:
    config = loaded.config
    return cache_key(STAGE, precompute_key, key_payload(config.head), key_payload(config.train), key_payload(config.split))


def ensure_train(ctx: Context, loaded: LoadedConfig) -> Artifact:
    if not loaded.config.trains:
        raise FishcompError(f"{loaded.path}: nothing to train (add a `head:` section, or use an ensemble's members)")
    features = ensure_precompute(ctx, loaded)
    key = train_key(features.key, loaded)
    artifact = ctx.cache.ensure(STAGE, loaded.name, key, lambda tmp: _build(loaded, features, tmp))
    summary = json.loads(artifact.file("summary.json").read_text())
    stage_line(
        STAGE, artifact.built, artifact.path,
        f"[{loaded.name}] valid logloss {summary['valid_logloss']:.4f}, accuracy {summary['valid_accuracy']:.3f}",
    )
    return artifact


class _Features:
    """Rows of a memory-mapped feature array, fetched a batch at a time as float32 tensors."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows
        # Small arrays (pooled vectors) are worth holding in memory; maps stay on disk.
        if array.nbytes < 1 << 30:
            self.array = np.ascontiguousarray(array)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    def batch(self, positions: np.ndarray):
        import torch

        rows = self.rows[positions]
        order = np.argsort(rows)  # sorted reads are sequential on a memory map
        data = np.empty((len(rows),) + self.shape, dtype=np.float32)
        data[order] = self.array[rows[order]]
        return torch.from_numpy(data)


def _predict(model, features: _Features, device, batch_size: int = 256) -> np.ndarray:
    import torch

    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            positions = np.arange(start, min(start + batch_size, len(features)))
            logits = model(features.batch(positions).to(device))["logits"]
            outputs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0))


def _fit_fold(loaded, fold, train_rows, valid_rows, features, labels, num_classes, device, record, advance):
    import torch
    from torch import nn

    from fishcomp.models.heads import create_head

    config = loaded.config
    train_cfg = config.train
    torch.manual_seed(train_cfg.seed * 1000 + fold)
    generator = np.random.default_rng([train_cfg.seed, fold])
    model = create_head(config.head, features.shape, num_classes).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=train_cfg.phases[0].lr, weight_decay=train_cfg.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    train_set = _Features(features.array, features.rows[train_rows])
    valid_set = _Features(features.array, features.rows[valid_rows])
    train_labels = torch.from_numpy(labels[train_rows])
    valid_labels = labels[valid_rows]
    best = (np.inf, None, -1)
    epoch = 0
    for phase in train_cfg.phases:
        for group in optimiser.param_groups:
            group["lr"] = phase.lr
        for _ in range(phase.epochs):
            started = time.time()
            model.train()
            order = generator.permutation(len(train_set))
            total, seen = 0.0, 0
            for start in range(0, len(order), train_cfg.batch_size):
                positions = order[start : start + train_cfg.batch_size]
                if len(positions) < 2 and len(order) > 1:
                    continue  # BatchNorm cannot normalise a batch of one
                x = train_set.batch(positions).to(device)
                y = train_labels[positions].to(device)
                loss = criterion(model(x)["logits"], y)
                if not torch.isfinite(loss):
                    raise FishcompError(
                        f"[{loaded.name}] fold {fold} epoch {epoch + 1}: loss is {loss.item()}; "
                        "lower the learning rate (train.phases) or check the features for NaN"
                    )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(positions)
                seen += len(positions)
            probs = _predict(model, valid_set, device)
            valid_logloss = log_loss(valid_labels, probs)
            # The training criterion on validation (log-probabilities are valid logits for it).
            log_probs = torch.log(torch.from_numpy(probs).clamp_min(1e-15))
            valid_loss = float(criterion(log_probs, torch.from_numpy(valid_labels)).item())
            epoch += 1
            record.append(
                {
                    "fold": fold, "epoch": epoch, "lr": phase.lr, "train_loss": total / max(seen, 1),
                    "valid_loss": valid_loss, "valid_logloss": valid_logloss,
                    "valid_accuracy": accuracy(valid_labels, probs), "seconds": round(time.time() - started, 3),
                }
            )
            if valid_logloss < best[0]:
                best = (valid_logloss, copy.deepcopy(model.state_dict()), epoch)
            advance(1, note=f"fold {fold} epoch {epoch} valid logloss {valid_logloss:.4f}")
    model.load_state_dict(best[1])
    return model, best[2]


def _build(loaded: LoadedConfig, features_artifact: Artifact, tmp: Path) -> dict:
    import torch

    config = loaded.config
    meta = json.loads(features_artifact.file("meta.json").read_text())
    classes = meta["classes"]
    kind = "map" if head_uses_map(config.head) else "pooled"
    index = load_index(features_artifact)
    train_index = index[index.split == "train"].reset_index(drop=True)
    usable = np.flatnonzero(train_index.ok.to_numpy())
    if len(usable) < len(train_index):
        warn(f"[{loaded.name}] {len(train_index) - len(usable)} unreadable train image(s) left out of training")
    labels_all = train_index.label.to_numpy()
    labels = labels_all[usable]
    missing = [c for i, c in enumerate(classes) if not (labels == i).any()]
    if missing:
        warn(f"[{loaded.name}] no train images of {', '.join(missing)}: the model can only predict them from smoothing")
    folds = assign_folds(labels, config.split)
    device = resolve_device(config.train.device)
    train_features = _Features(load_features(features_artifact, "train", kind), usable)
    test_splits = [s for s in ("test_stg1", "test_stg2") if (index.split == s).any()]

    n_folds = fold_count(folds)
    oof = np.full((len(usable), len(classes)), np.nan)
    test_probs = {split: [] for split in test_splits}
    records: list[dict] = []
    best_epochs = []
    (tmp / "checkpoints").mkdir()
    with progress(f"train {loaded.name}", n_folds * config.train.epochs) as advance:
        for fold in range(n_folds):
            valid = np.flatnonzero(folds == fold)
            train = np.flatnonzero(folds != fold)
            model, best_epoch = _fit_fold(
                loaded, fold, train, valid, train_features, labels, len(classes), device, records, advance
            )
            best_epochs.append(best_epoch)
            oof[valid] = _predict(model, _Features(train_features.array, usable[valid]), device)
            for split in test_splits:
                array = load_features(features_artifact, split, kind)
                test_probs[split].append(_predict(model, _Features(array, np.arange(len(array))), device))
            torch.save(
                {"state_dict": model.state_dict(), "head": key_payload(config.head), "classes": classes, "in_shape": train_features.shape},
                tmp / "checkpoints" / f"fold{fold}.pt",
            )

    oof_frame = pd.DataFrame(oof, columns=classes)
    oof_frame.insert(0, "fold", folds)
    oof_frame.insert(0, "label", labels)
    oof_frame.insert(0, "image", train_index.image.to_numpy()[usable])
    tests = {}
    for split in test_splits:
        tests[split] = pd.DataFrame(np.mean(test_probs[split], axis=0), columns=classes)
        tests[split].insert(0, "image", index[index.split == split].image.to_numpy())
    Predictions(classes=list(classes), oof=oof_frame, tests=tests).write(tmp)
    pd.DataFrame(records).to_csv(tmp / "metrics.csv", index=False)

    validated = folds >= 0
    summary = {
        "name": loaded.name,
        "head": config.head.kind,
        "features": kind,
        "split": config.split.kind,
        "folds": n_folds,
        "train_images": int(len(usable)),
        "best_epochs": best_epochs,
        "valid_logloss": log_loss(labels[validated], oof[validated]),
        "valid_accuracy": accuracy(labels[validated], oof[validated]),
        "prior_logloss": prior_log_loss(labels, labels[validated], len(classes)),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / "config.yaml").write_text(dump_yaml(config.model_dump(mode="json")))
    return {"summary": summary}
