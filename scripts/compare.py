"""Train every head config on the same data and print one markdown table.

    python scripts/compare.py [--data data] [--work artifacts] [--set key=value ...]

Each row is `fishcomp train -c configs/<head>.yaml` (cached like any run), so a second call only
prints. Extra `--set` values apply to every head (e.g. `--set split.kind=holdout` for a quick pass).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fishcomp.config import load_config
from fishcomp.stages.context import Context
from fishcomp.stages.train import ensure_train

HEADS = ["dense", "dense_360x640", "gap", "leakage", "bbox", "fcn", "inception", "resblock"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--work", type=Path, default=Path("artifacts"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--heads", nargs="*", default=HEADS)
    args = parser.parse_args()
    ctx = Context(data_dir=args.data, work_dir=args.work, overrides=args.overrides)
    rows = []
    for name in args.heads:
        loaded = load_config(CONFIGS / f"{name}.yaml", args.overrides)
        artifact = ensure_train(ctx, loaded)
        manifest = json.loads((artifact.path / "manifest.json").read_text())
        summary = json.loads((artifact.path / "summary.json").read_text())
        size = "x".join(map(str, summary["input_size"]))
        iou = f"{summary['valid_iou']:.3f}" if "valid_iou" in summary else ""
        pointing = f"{summary['valid_pointing']:.3f}" if "valid_pointing" in summary else ""
        train_seconds = manifest["seconds"]  # the train artifact's own build, not its features
        rows.append(
            f"| {name} | {summary['head']} | {size} | {summary['valid_logloss']:.4f} | {summary['valid_accuracy']:.3f} "
            f"| {iou} | {pointing} | {train_seconds:.0f} |"
        )
    print()
    print("| config | head | input | valid log loss | accuracy | box IoU | heatmap pointing | train s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
