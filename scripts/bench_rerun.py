"""A re-run must cost nothing: wall time of `fishcomp run` on the demo data, cold then cached.

    python scripts/bench_rerun.py [--data data] [--config configs/demo.yaml]

Both runs are fresh processes on a fresh artifact folder (the data is generated as `make demo`
does when missing). Last line: `ratio=<second/first> target=0.05` (smaller is better).
"""

from __future__ import annotations

import argparse
import os
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
        env={**os.environ, "FISHCOMP_NO_PROGRESS": "1"}, check=True,
    )
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    args = parser.parse_args()
    from fishcomp.context import describe_machine

    print(f"machine: {describe_machine()}", flush=True)
    if not (args.data / "train").is_dir():
        # The data `make demo` makes.
        fishcomp("synth", str(args.data), "--n-train", "800", "--n-test", "200", "--n-stage2", "100", "--seed", "0")
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "submission.csv"
        common = ["run", "-c", str(args.config), "--data", str(args.data), "--work", work, "--out", str(out)]
        first, _ = fishcomp(*common)
        second, log = fishcomp(*common)
    stages = [line.split()[:2] for line in log.splitlines() if line.split()[:1] and line.split()[0] in ("precompute", "train", "ensemble", "submit")]
    print(f"first run {first:.1f} s, second run {second:.2f} s; second run stages: {' '.join(f'{s}={v}' for s, v in stages)}")
    print(f"ratio={second / first:.4f} target=0.05")


if __name__ == "__main__":
    main()
