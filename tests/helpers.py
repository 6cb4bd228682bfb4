"""What the tests share besides fixtures: the real CLI entry point and the shrinking overrides."""

from pathlib import Path

import pytest

from fishcomp.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_cli(args, capsys):
    """Run the real CLI entry point; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# Shrinks the real configs so a whole pipeline runs in seconds on 2 CPU cores.
TINY = ["split.folds=3", "train.batch_size=32"]
# And every backbone pass at 128x224: what the pipeline and crops tests check does not depend on
# the size, and pipeline.yaml's 360x640 members (and the crops' detector) would dominate the suite.
SMALL = TINY + ["precompute.size=[128,224]"]


def wait_for_file(path: Path, process, limit_s: float = 600) -> None:
    """Block until a subprocess creates `path` (its own signal that it reached a point), failing
    at once if it exits first. The limit only guards against a hang; it never decides a result."""
    import time

    deadline = time.monotonic() + limit_s
    while not path.exists():
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(f"the process exited ({process.returncode}) before reaching its pause point: {stderr[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {path} after {limit_s} s")
        time.sleep(0.05)


def interruptible() -> None:
    """For subprocesses a test interrupts with SIGINT, as Ctrl-C in a terminal would: a suite run
    in the background (CI, `make test &`) starts its children with SIGINT ignored, and Python then
    never turns SIGINT into KeyboardInterrupt. Restore the default before the child starts."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
