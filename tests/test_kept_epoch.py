"""Which epoch a fold keeps (`train.keep`), and that its out-of-fold predictions are that epoch's."""

import json

import pandas as pd
import pytest
from helpers import CONFIGS, SMALL, run_cli

from fishcomp.metrics import log_loss


@pytest.mark.parametrize("keep", ["best", "last"])
def test_each_fold_predicts_with_the_epoch_it_keeps(tiny_data, tmp_path, capsys, keep):
    sets = [arg for override in [*SMALL, f"train.keep={keep}"] for arg in ("--set", override)]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", tmp_path, *sets], capsys)
    assert code == 0, stderr
    folder = next((tmp_path / "train").glob("dense-*"))
    summary = json.loads((folder / "summary.json").read_text())
    metrics = pd.read_csv(folder / "metrics.csv")
    oof = pd.read_csv(folder / "oof.csv")
    classes = list(oof.columns[3:])
    for fold, kept in enumerate(summary["kept_epochs"]):
        rows = metrics[metrics.fold == fold].reset_index(drop=True)
        lowest = int(rows.epoch[rows.valid_logloss.idxmin()])
        assert kept == (int(rows.epoch.max()) if keep == "last" else lowest)
        assert summary["stopping"][fold]["best_epoch"] == lowest and summary["stopping"][fold]["kept_epoch"] == kept
        # The fold's out-of-fold predictions come from the kept epoch's weights: the same images
        # through the same code give that epoch's validation log loss (float32 on the CPU: the
        # same arithmetic twice, so equal to rounding).
        mine = oof[oof.fold == fold]
        scored = log_loss(mine.label.to_numpy(), mine[classes].to_numpy())
        assert scored == pytest.approx(float(rows.valid_logloss[rows.epoch == kept].iloc[0]), abs=1e-6)
    assert summary["epochs_chosen_on"] == ("none: each fold keeps its last epoch" if keep == "last" else "the validation fold")


@pytest.mark.parametrize("choosing", ["train.early_stopping=2", "train.inner_valid=0.15"])
def test_choosing_an_epoch_with_the_last_one_kept_is_a_one_line_error(tiny_data, tmp_path, capsys, choosing):
    sets = ["--set", "train.keep=last", "--set", choosing]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "dense.yaml", "--data", tiny_data, "--work", tmp_path, *sets], capsys)
    assert code == 2 and "needs train.keep: best" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
