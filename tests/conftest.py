import os
from pathlib import Path

import pytest

from fishcomp.cli import main

os.environ.setdefault("FISHCOMP_NO_PROGRESS", "1")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_cli(args, capsys):
    """Run the real CLI entry point; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (images at 1/5 of the real camera sizes) shared by the tests."""
    from fishcomp.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(root, n_train=120, n_test=24, n_stage2=12, seed=3, scale=0.2, workers=2)
    return root


# Shrinks the real configs so a whole pipeline runs in seconds on 2 CPU cores.
TINY = ["split.folds=3", "train.batch_size=32"]
# And every backbone pass at 128x224: what the pipeline and crops tests check does not depend on
# the size, and pipeline.yaml's 360x640 members (and the crops' detector) would dominate the suite.
SMALL = TINY + ["precompute.size=[128,224]"]
