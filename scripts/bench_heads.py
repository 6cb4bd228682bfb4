"""Why precompute: one epoch of a head on cached features against one epoch of fine-tuning.

    python scripts/bench_heads.py [--images 160] [--size 224x224]

Both train on the same synthetic images with the same fold split, batch size and threads, through
the real trainers (the dense head on cached pooled features; `train.finetune` on decoded,
augmented images, float32). The cached features are computed first and not counted: that is the
point. On a CPU with native bf16 it also times a fine-tuning epoch under bf16 autocast (what
`train.precision: auto` chooses against). Last line: `ratio=<head epoch / fine-tune epoch>
target=0.02` (smaller is better).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def epoch_seconds(data: Path, work: Path, config: str, overrides: list[str]) -> float:
    """Seconds of the second epoch of fold 0 (the first pays one-off start-up costs)."""
    from fishcomp.config import load_config
    from fishcomp.context import Context
    from fishcomp.pipeline import features as ensure_features
    from fishcomp.training.data import prepare_training
    from fishcomp.training.folds import make_trainer

    loaded = load_config(CONFIGS / config, overrides)
    ctx = Context(data_dir=data, work_dir=work, overrides=overrides)
    features = ensure_features(ctx, loaded)
    records: list[dict] = []
    data_ = prepare_training(loaded, features)
    trainer = make_trainer(ctx, data_, features)
    folds = data_.folds
    trainer.fit(0, np.flatnonzero(folds != 0), np.flatnonzero(folds == 0), records, lambda *a, **k: None)
    return float(records[1]["seconds"])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--size", default="224x224")
    args = parser.parse_args()
    from fishcomp.context import describe_machine

    print(f"machine: {describe_machine()}", flush=True)
    os.environ.setdefault("FISHCOMP_NO_PROGRESS", "1")
    from fishcomp.context import cpu_has_bf16
    from fishcomp.data.synth import synthesize

    height, width = (int(v) for v in args.size.split("x"))
    shared = [f"precompute.size=[{height},{width}]", "split.kind=holdout", "train.batch_size=32", "train.phases=[{epochs: 2, lr: 1.0e-4}]"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize(data, n_train=args.images, n_test=1, seed=5)
        head = epoch_seconds(data, Path(tmp) / "work", "dense.yaml", shared)
        tune = epoch_seconds(data, Path(tmp) / "work", "finetune.yaml", shared + ["train.finetune.warmup_epochs=0", "train.precision=fp32"])
        tune_bf16 = None
        if cpu_has_bf16():
            tune_bf16 = epoch_seconds(data, Path(tmp) / "work", "finetune.yaml", shared + ["train.finetune.warmup_epochs=0", "train.precision=bf16"])
    print(f"{torch.get_num_threads()} torch threads, {args.images} images at {args.size}: "
          f"dense head epoch {head:.3f} s, fine-tuning epoch {tune:.1f} s ({tune / head:.0f}x)")
    if tune_bf16 is not None:
        print(f"fine-tuning epoch under bf16 autocast: {tune_bf16:.1f} s ({tune_bf16 / tune:.2f}x the float32 epoch)")
    print(f"ratio={head / tune:.4f} target=0.02")


if __name__ == "__main__":
    main()
