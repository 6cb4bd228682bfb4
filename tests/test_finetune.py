"""End-to-end fine-tuning (`train.finetune`) on tiny images: it learns, with any pooled head, and
its predictions join an ensemble; configs it cannot train are refused before anything runs."""

import json

import pandas as pd
import pytest
from helpers import CONFIGS, TINY, run_cli

SMALL = TINY + ["precompute.size=[96,160]", "train.phases=[{epochs: 2, lr: 3.0e-4}]", "train.batch_size=16"]


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
    assert summary["finetune"]["layer_decay"] == 0.85
    blend = json.loads(next((tmp_path / "work" / "ensemble").glob("blend-*/summary.json")).read_text())
    assert [m["name"] for m in blend["members"]] == ["dense", "finetune"]
    assert blend["valid_logloss"] <= min(m["valid_logloss"] for m in blend["members"]) + 1e-9
    assert (tmp_path / "sub.csv").is_file()


def test_any_head_on_the_pooled_vector_fine_tunes(tiny_data, tmp_path, capsys):
    """Fine-tuning is a way of training, not a head: the dense head from the registry trains with
    the backbone under it, warm-started on the cached features."""
    args = ["train", "-c", CONFIGS / "finetune.yaml", "--data", tiny_data, "--work", tmp_path / "work"]
    for override in SMALL + ["head.kind=dense", "split.kind=holdout"]:
        args += ["--set", override]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    folder = next((tmp_path / "work" / "train").glob("finetune-*"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["head"] == "dense" and summary["features"] == "images"
    assert summary["valid_logloss"] < summary["prior_logloss"]
    import torch

    state = torch.load(folder / "checkpoints" / "fold0.pt", weights_only=True)["state_dict"]
    assert any(k.startswith("backbone.blocks.") for k in state) and any(k.startswith("head.trunk.") for k in state)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.pseudo={source: dense.yaml}", "train.pseudo works with heads on cached features, not with train.finetune"),
        ("head.kind=fcn", "train.finetune trains the backbone under a head on its pooled vector"),
        ("head.kind=leakage", "head.kind leakage also needs the image size"),
    ],
    ids=["pseudo", "map-head", "size-head"],
)
def test_what_fine_tuning_cannot_train_is_refused_before_anything_runs(tmp_path, capsys, override, message):
    code, _, stderr = run_cli(["dag", "-c", CONFIGS / "finetune.yaml", "--work", tmp_path / "work", "--set", override], capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("meta.json"))
