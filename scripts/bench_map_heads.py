"""Training the map heads against the backbone pass that made their input.

    python scripts/bench_map_heads.py [--images 240] [--heads fcn bbox_grid bbox_grid_k64] [--set key=value ...]

On N synthetic camera-sized images: the 360x640 precompute stage with the map (its own build
time, decode included), then each head config as shipped (5 folds, its epochs) trained on those
cached maps (the train artifact's own build time). Each head's ratio is its training time over
the pass's time; the last line is `ratio=<the worst head's> target=1.0`: a head on cached
features should cost no more than computing the features once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--heads", nargs="*", default=["fcn", "bbox_grid", "bbox_grid_k64"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", type=Path, default=None, help="keep the data and artifacts here (default: a temporary folder)")
    args = parser.parse_args()
    from fishcomp.context import describe_machine

    print(f"machine: {describe_machine()}", flush=True)

    from fishcomp.allocator import keep_freed_memory
    from fishcomp.config import load_config
    from fishcomp.context import Context
    from fishcomp.data.synth import synthesize
    from fishcomp.pipeline import resolver

    keep_freed_memory()  # as the CLI does

    with tempfile.TemporaryDirectory() as scratch:
        root = args.work or Path(scratch)
        data = root / "data"
        if not (data / "train").is_dir():
            synthesize(data, n_train=args.images, n_test=max(8, args.images // 8), n_stage2=0, seed=11)
        ctx = Context(data_dir=data, work_dir=root / "work", overrides=args.overrides)
        plan = resolver(ctx)
        ratios = {}
        pass_seconds = None
        for name in args.heads:
            loaded = load_config(CONFIGS / f"{name}.yaml", args.overrides)
            node = plan.node("train", loaded)
            features = plan.build(node.inputs["features"])
            meta = json.loads(features.file("meta.json").read_text())
            if pass_seconds is None:
                pass_seconds = meta["seconds"]
                print(f"360x640 pass with maps: {meta['counts']['total']} images in {pass_seconds:.1f} s "
                      f"({meta['images_per_second']:.1f} img/s, {meta.get('precision', 'fp32')})")
            trained = plan.build(node)
            seconds = json.loads(trained.file("manifest.json").read_text())["seconds"]
            summary = json.loads(trained.file("summary.json").read_text())
            ratios[name] = seconds / pass_seconds
            print(f"{name}: {summary['folds']} folds, kept epochs {summary['kept_epochs']}, valid logloss "
                  f"{summary['valid_logloss']:.4f}, trained in {seconds:.1f} s: {ratios[name]:.2f} x the pass")
    worst = max(ratios.values())
    print(f"ratio={worst:.3f} target=1.0")


if __name__ == "__main__":
    main()
