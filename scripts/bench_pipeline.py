"""The whole pipeline against one bare backbone pass over its images.

    python scripts/bench_pipeline.py [--train 600 --test 150 --stage2 60] [--config configs/pipeline.yaml] [--keep DIR]

Synthesises a set of that size, runs `fishcomp run -c CONFIG` in a fresh work folder, and divides
its wall time by one bare 360x640 float32 pass of the backbone (random tensors of that shape,
batch 32, this process's threads) over the same number of images, measured in the same run.
Prints the seconds of every stage the run built, from the artifacts' manifests, and ends with
`ratio=<run / pass> target=4.0`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bare_pass_seconds(images: int, size=(360, 640), batch_size: int = 32) -> float:
    import torch

    from fishcomp.config import PrecomputeConfig
    from fishcomp.models.backbones import create_backbone

    model = create_backbone(PrecomputeConfig(size=size)).model.to(memory_format=torch.channels_last)
    batch = torch.randn(batch_size, 3, *size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model.forward_head(model.forward_features(batch[:2]), pre_logits=True)  # warm-up
        started, done = time.perf_counter(), 0
        while done < images:
            model.forward_head(model.forward_features(batch), pre_logits=True)
            done += batch_size
        return (time.perf_counter() - started) * images / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--stage2", type=int, default=60)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "pipeline.yaml")
    parser.add_argument("--keep", type=Path, default=None, help="keep the data and artifacts here")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from fishcomp.allocator import keep_freed_memory
    from fishcomp.data.synth import synthesize

    keep_freed_memory()  # the bare pass runs as the CLI's processes do
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        data, work = root / "data", root / "work"
        if not (data / "train").is_dir():
            synthesize(data, n_train=args.train, n_test=args.test, n_stage2=args.stage2, seed=7)
        images = args.train + args.test + args.stage2
        before = bare_pass_seconds(images)
        command = [sys.executable, "-m", "fishcomp", "run", "-c", str(args.config), "--data", str(data), "--work", str(work),
                   "--out", str(root / "submission.csv"), *[a for o in args.overrides for a in ("--set", o)]]
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "FISHCOMP_NO_PROGRESS": "1"})
        wall = time.perf_counter() - started
        bare = (before + bare_pass_seconds(images)) / 2  # this machine's speed drifts within a run
        print("stage       seconds  artifact")
        for manifest in sorted(work.glob("*/*/manifest.json"), key=lambda p: json.loads(p.read_text())["created"]):
            print(f"{manifest.parent.parent.name:<11} {json.loads(manifest.read_text())['seconds']:7.1f}  {manifest.parent.name}")
        print(f"run: {wall:.1f} s for {images} images; one bare 360x640 fp32 pass: {bare:.1f} s")
        print(f"ratio={wall / bare:.3f} target=4.0")


if __name__ == "__main__":
    main()
