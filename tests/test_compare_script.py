"""scripts/compare.py: its rows score each head on both test stages where the data has answers."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import SMALL

from fishcomp.metrics import log_loss

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare.py"


def _compare():
    spec = importlib.util.spec_from_file_location("compare_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_scores_stage_two_on_new_boats_where_the_data_has_it(tiny_data, tmp_path):
    compare = _compare()
    [row] = compare.one_set(tiny_data, tmp_path / "work", ["linear"], SMALL, blend=False)
    folder = next((tmp_path / "work" / "train").glob("linear-*"))
    truth = pd.read_csv(tiny_data / "solution.csv").set_index("image")
    for key, split in (("test", "test_stg1"), ("stage2", "test_stg2")):
        predicted = pd.read_csv(folder / f"{split}.csv").set_index("image")
        expected = log_loss(truth.loc[predicted.index].to_numpy().argmax(axis=1), predicted[truth.columns].to_numpy())
        assert np.isfinite(row[key]) and row[key] == expected
    assert "stage-2 log loss" in compare.table([[row]]).splitlines()[0]
    # Data without a stage-2 test: the table looks as it always did.
    assert "stage-2" not in compare.table([[{**row, "stage2": None}]])


def test_compare_makes_one_backbone_pass_for_pooled_and_map_heads_of_one_size(tiny_data, tmp_path):
    compare = _compare()
    # linear reads the pooled vector, gap the 224 map: the pass with the map serves both.
    rows = compare.one_set(tiny_data, tmp_path / "work", ["linear", "gap"], SMALL, blend=False)
    assert [row["config"] for row in rows] == ["linear", "gap"]
    passes = [p for p in (tmp_path / "work" / "precompute").iterdir() if not p.name.startswith(".")]  # not the cache's locks
    assert len(passes) == 1 and (passes[0] / "train_map.npy").exists()


def test_a_head_named_with_overrides_is_that_config_varied_beside_it(tiny_data, tmp_path):
    compare = _compare()
    rows = compare.one_set(tiny_data, tmp_path / "work", ["linear", "linear:head.strengths=[0.01];head.max_iter=50"], SMALL, blend=False)
    assert [row["config"] for row in rows] == ["linear", "linear:head.strengths=[0.01];head.max_iter=50"]
    folders = list((tmp_path / "work" / "train").glob("linear-*"))
    assert len(folders) == 2  # same backbone pass, two trainings
    strengths = {tuple(sorted(pd.read_csv(f / "metrics.csv").strength.dropna().unique())) for f in folders}
    assert strengths == {(0.001, 0.003, 0.01, 0.03, 0.1, 0.3), (0.01,)}
    assert rows[0]["valid"] != rows[1]["valid"]


def test_each_head_is_set_against_the_probe_on_its_features_image_by_image(tiny_data, tmp_path):
    compare = _compare()
    rows = compare.one_set(tiny_data, tmp_path / "work", ["linear", "dense_probe"], SMALL, blend=False)
    probe, head = rows
    assert probe["vs_probe"] is None  # the floor itself
    versus = head["vs_probe"]
    assert versus["difference"] == pytest.approx(head["valid"] - probe["valid"], abs=1e-9)
    assert versus["low"] <= versus["difference"] <= versus["high"]
    line = next(line for line in compare.table([rows]).splitlines() if line.startswith("| dense_probe "))
    verdict = "better on 1" if versus["high"] < 0 else "worse on 1" if versus["low"] > 0 else "better on 0, worse on 0"
    assert f"{versus['difference']:+.4f}; " in line and verdict in line and line.endswith(f"of 1 | {head['seconds']:.0f} |")


def test_a_pooled_head_is_set_against_the_probe_that_pools_as_it_reads_not_the_gem_probe_of_its_pass(tiny_data, tmp_path):
    """The GeM probe reads the map of the same pass as the average-pooled probe; a dense head on
    the pooled vector is measured against the average-pooled one, whichever comes first."""
    compare = _compare()
    rows = compare.one_set(tiny_data, tmp_path / "work", ["linear:head.pool=gem", "linear", "dense_probe"], SMALL, blend=False)
    gem, probe, head = rows
    assert gem["features"] == probe["features"] == head["features"]  # one pass, with its map
    assert gem["valid"] != probe["valid"]
    assert head["vs_probe"]["difference"] == pytest.approx(head["valid"] - probe["valid"], abs=1e-9)
