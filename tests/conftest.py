import os
from pathlib import Path

import pytest

os.environ.setdefault("FISHCOMP_NO_PROGRESS", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Under pytest-xdist (`-n N`) the workers share the cores: each takes its share of them, as
    # torchrun's ranks do, instead of every worker taking them all.
    import torch

    from fishcomp.distributed import share_of_cores

    torch.set_num_threads(share_of_cores(int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (images at 1/5 of the real camera sizes) shared by the tests."""
    from fishcomp.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(root, n_train=120, n_test=24, n_stage2=12, seed=3, scale=0.2, workers=2)
    return root


def pytest_collection_modifyitems(config, items):
    """Every test that runs the real backbone on the synthetic set (it asks for `tiny_data`) is
    `slow`: `pytest -m "not slow"` is the quick loop, CI runs everything."""
    for item in items:
        if "tiny_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
