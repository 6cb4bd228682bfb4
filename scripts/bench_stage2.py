"""Stage 2's photos after a run cost only themselves: `fishcomp run` of a config on data without
`test_stg2/`, then again once the stage-2 photos are added (the run takes every backbone pass's,
crops' and head's train part from the first: README, "Stage 2's photos"), against a run from
scratch over all the photos, in one process tree.

    python scripts/bench_stage2.py [--data data] [--config configs/demo.yaml] [--keep DIR] [--set KEY=VALUE ...]

The data (generated as `make demo` does when missing) must have a `test_stg2/`; it is copied with
its files' times, so the copies are the same photos to the cache. Prints each run's seconds, what
the second run took from the first, and how far its submissions are from the run from scratch's,
then `ratio=<second run / run from scratch> target=0.25`: the stage-2 photos are about a tenth of
the images, and predicting them with trained heads is cheap; past a quarter of a full run,
something was trained or embedded again.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fishcomp(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "fishcomp", *args], capture_output=True, text=True,
        env={**os.environ, "FISHCOMP_NO_PROGRESS": "1"},
    )
    if result.returncode != 0:
        sys.exit(f"fishcomp {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result.stdout + result.stderr


def main() -> None:
    import numpy as np
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--keep", type=Path, default=None, help="keep the data copy and work folders here")
    parser.add_argument("--set", action="append", default=[], help="a config override for every run (as fishcomp's --set)")
    args = parser.parse_args()
    from fishcomp.context import describe_machine

    print(f"machine: {describe_machine()}", flush=True)
    if not (args.data / "train").is_dir():
        fishcomp("synth", str(args.data), "--n-train", "800", "--n-test", "200", "--n-stage2", "100", "--seed", "0")
    if not (args.data / "test_stg2").is_dir():
        sys.exit(f"{args.data} has no test_stg2/: nothing to add after the first run")
    folder = Path(tempfile.mkdtemp()) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    try:
        data = folder / "data"
        shutil.copytree(args.data, data, ignore=shutil.ignore_patterns("test_stg2", "sample_submission_stg2.csv"))

        def run(work: str) -> tuple[float, str, Path]:
            out = folder / work / "submission.csv"
            sets = [arg for value in args.set for arg in ("--set", value)]
            seconds, log = fishcomp("run", "-c", str(args.config), "--data", str(data), "--work", str(folder / work), "--out", str(out), *sets)
            return seconds, log, out

        first, _, _ = run("work")
        print(f"run without the stage-2 photos: {first:.1f} s", flush=True)
        shutil.copytree(args.data / "test_stg2", data / "test_stg2")
        if (args.data / "sample_submission_stg2.csv").is_file():
            shutil.copy2(args.data / "sample_submission_stg2.csv", data)
        second, log, out = run("work")
        print(f"the same run with them added: {second:.1f} s", flush=True)
        for line in log.splitlines():
            if " reusing " in line:
                print("  " + re.sub(r"\s+", " ", line.strip()))
        fresh, _, fresh_out = run("fresh")
        print(f"a run from scratch with them: {fresh:.1f} s", flush=True)
        for name in ("submission.csv", "submission_stg2.csv"):
            ours, theirs = out.with_name(name), fresh_out.with_name(name)
            same = ours.read_bytes() == theirs.read_bytes()
            gap = np.abs(pd.read_csv(ours).iloc[:, 1:].to_numpy() - pd.read_csv(theirs).iloc[:, 1:].to_numpy()).max()
            print(f"{name}: {'the same bytes' if same else f'largest difference {gap:.2e}'} as the run from scratch's")
        print(f"ratio={second / fresh:.4f} target=0.25")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
