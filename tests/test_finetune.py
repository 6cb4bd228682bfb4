"""End-to-end fine-tuning on tiny images: it learns, and its predictions join an ensemble."""

import json

import pandas as pd
from helpers import CONFIGS, TINY, run_cli

SMALL = TINY + ["precompute.size=[96,160]", "train.phases=[{epochs: 3, lr: 3.0e-4}]", "train.batch_size=16"]


def test_finetuning_lowers_its_loss_and_joins_an_ensemble(tiny_data, tmp_path, capsys):
    ensemble = tmp_path / "blend.yaml"
    ensemble.write_text(
        "name: blend\n"
        f"ensemble:\n  weights: fitted\n  members:\n    - {{config: {CONFIGS / 'dense.yaml'}}}\n    - {{config: {CONFIGS / 'finetune.yaml'}}}\n"
        "submit:\n  clip: auto\n"
    )
    args = ["run", "-c", ensemble, "--data", tiny_data, "--work", tmp_path / "work", "--out", tmp_path / "sub.csv"]
    for override in SMALL:
        args += ["--set", override]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    folder = next((tmp_path / "work" / "train").glob("finetune-*"))
    metrics = pd.read_csv(folder / "metrics.csv")
    for _, fold in metrics.groupby("fold"):
        assert fold.train_loss.iloc[-1] < fold.train_loss.iloc[0]  # it learns
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["valid_logloss"] < summary["prior_logloss"]
    assert summary["features"] == "images" and len(list((folder / "checkpoints").glob("fold*.pt"))) == 3
    blend = json.loads(next((tmp_path / "work" / "ensemble").glob("blend-*/summary.json")).read_text())
    assert [m["name"] for m in blend["members"]] == ["dense", "finetune"]
    assert blend["valid_logloss"] <= min(m["valid_logloss"] for m in blend["members"]) + 1e-9
    assert (tmp_path / "sub.csv").is_file()


def test_finetune_and_pseudo_labels_are_refused_together(tmp_path, capsys):
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "finetune.yaml", "--set", "train.pseudo={source: dense.yaml}"], capsys)
    assert code == 2 and "train.pseudo works with heads on cached features" in stderr
