"""The whole pipeline against one bare backbone pass over its images.

    python scripts/bench_pipeline.py [--train 600 --test 150 --stage2 60] [--config configs/pipeline.yaml] [--keep DIR]

Synthesises a set of that size, runs `fishcomp run -c CONFIG` in a fresh work folder, and divides
its wall time by one bare 360x640 float32 pass of the backbone (random tensors of that shape,
this process's threads) over the same number of images, measured in the same run: the faster of
32 images a call and the pipeline's own calls (on a CPU, fishcomp.features.CPU_CALL_PIXELS).
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


def bare_pass_seconds(images: int, per_call: int | None, size=(360, 640)) -> float:
    """One fp32 pass of random tensors through the backbone, `per_call` images a call (None: as
    the pipeline's stages call it here)."""
    from bench_precompute import bare_backbone

    return images / bare_backbone(size, images, "fp32", per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--stage2", type=int, default=60)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "pipeline.yaml")
    parser.add_argument("--keep", type=Path, default=None, help="keep the data and artifacts here")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from fishcomp.context import describe_machine

    print(f"machine: {describe_machine()}", flush=True)
    from fishcomp.allocator import keep_freed_memory
    from fishcomp.data.synth import synthesize

    keep_freed_memory()  # the bare pass runs as the CLI's processes do
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        data, work = root / "data", root / "work"
        if not (data / "train").is_dir():
            synthesize(data, n_train=args.train, n_test=args.test, n_stage2=args.stage2, seed=7)
        images = args.train + args.test + args.stage2
        # The yardstick is the faster of 32 images a call (every session before 16) and the
        # pipeline's own calls (fishcomp.features.CPU_CALL_PIXELS): a pass made faster must not
        # flatter the ratio.
        before = {calls: bare_pass_seconds(images, per_call=calls) for calls in (32, None)}
        command = [sys.executable, "-m", "fishcomp", "run", "-c", str(args.config), "--data", str(data), "--work", str(work),
                   "--out", str(root / "submission.csv"), *[a for o in args.overrides for a in ("--set", o)]]
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "FISHCOMP_NO_PROGRESS": "1"})
        wall = time.perf_counter() - started
        # This machine's speed drifts within a run: each yardstick is the mean of before and after.
        passes = {calls: (seconds + bare_pass_seconds(images, per_call=calls)) / 2 for calls, seconds in before.items()}
        bare = min(passes.values())
        print("stage       seconds  artifact")
        for manifest in sorted(work.glob("*/*/manifest.json"), key=lambda p: json.loads(p.read_text())["created"]):
            print(f"{manifest.parent.parent.name:<11} {json.loads(manifest.read_text())['seconds']:7.1f}  {manifest.parent.name}")
        print(f"run: {wall:.1f} s for {images} images; one bare 360x640 fp32 pass: {passes[32]:.1f} s at 32 images a call, "
              f"{passes[None]:.1f} s in the pipeline's calls; the ratio is against the faster")
        print(f"ratio={wall / bare:.3f} target=4.0")


if __name__ == "__main__":
    main()
