"""head.base: the dense family (dense, leakage, bbox) trained on top of a fitted linear probe,
starting at its predictions."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CONFIGS, SMALL, run_cli

from fishcomp.config import BboxHeadConfig, DenseHeadConfig, LeakageHeadConfig, LinearHeadConfig, load_config
from fishcomp.errors import FishcompError
from fishcomp.models.heads import create_head


# Every head of the dense family, on the pooled vector (the only input a probe reads).
FAMILY = {
    "dense": lambda **kw: DenseHeadConfig(**kw),
    "leakage": lambda **kw: LeakageHeadConfig(**kw),
    "bbox": lambda **kw: BboxHeadConfig(input="pooled", points_weight=1.0, **kw),
}


@pytest.mark.parametrize("kind", FAMILY)
def test_before_training_the_head_is_its_probe(kind):
    torch.manual_seed(0)
    head = create_head(FAMILY[kind](base=LinearHeadConfig(), hidden=32), (20,), 8, num_sizes=3).eval()
    probe = head.base
    with torch.no_grad():
        probe.mean.normal_(), probe.scale.uniform_(0.5, 2.0)
        probe.classifier.weight.normal_(), probe.classifier.bias.normal_()
    x, size = torch.randn(16, 20), torch.nn.functional.one_hot(torch.arange(16) % 3, 3).float()
    with torch.no_grad():
        outputs = head(x, size)
        features = head.forward_features(x, size)
        # The dense layers' output starts at exactly zero (zero weights and bias: no rounding).
        assert torch.equal(head.classifier(features[:, : head.classifier_inputs]), torch.zeros(16, 8))
        # So the sum is the probe's logits, up to the rounding of its 20-term dot products: the
        # head computes them on a slice of a wider tensor, which a CPU's kernels may sum in
        # another order. Each result is within (n+1)·eps·Σ|w·z| of the exact one (Higham's γ_n).
        standardised = probe.forward_features(x)
        weights, bias = probe.classifier.weight, probe.classifier.bias
        rounding = (standardised.shape[1] + 1) * torch.finfo(torch.float32).eps * (standardised.abs() @ weights.abs().T + bias.abs())
        assert ((outputs["logits"] - probe(x)["logits"]).abs() <= 2 * rounding).all()
    # The other outputs read the same features as the classifier: all of them, probe's input too.
    assert head.forward_features(x, size).shape == (16, head.num_features)
    assert all(outputs[name].shape == (16, 4) for name in ("box", "points") if kind == "bbox")
    # Only the dense layers learn: the probe stays as fitted.
    assert not any(p.requires_grad for p in probe.parameters())
    assert all(p.requires_grad for name, p in head.named_parameters() if not name.startswith("base."))


def _split(*epochs):
    return np.array(epochs, dtype=float)


def test_dense_layers_are_kept_only_where_they_beat_the_probe_by_more_than_noise():
    from fishcomp.training.folds import choose_dense_epochs

    probe = [1.0, 1.0, 1.0, 1.0]
    # Epoch 1 is lower on average (by 0.0125) but the per-image differences (-0.1 to +0.3) make
    # that well inside one standard error (0.13): one_se keeps the probe, lowest takes the epoch.
    noisy = [_split(probe, [0.9, 1.3, 0.7, 1.05])]
    assert choose_dense_epochs(noisy, "one_se")[:2] == (0, 1)
    assert choose_dense_epochs(noisy, "lowest")[:2] == (1, 1)
    # Lower on every image by 0.19 to 0.21: far beyond its standard error (0.004), so kept.
    clear = [_split(probe, [0.81, 0.79, 0.8, 0.8])]
    assert choose_dense_epochs(clear, "one_se")[:2] == (1, 1)
    # Three counts: 2 is the lowest, 1 within noise of it, 0 clearly worse: the fewest within, 1.
    steps = [_split(probe, [0.81, 0.79, 0.8, 0.8], [0.7, 0.9, 0.75, 0.8])]
    epochs, lowest, scores = choose_dense_epochs(steps, "one_se")
    assert (epochs, lowest) == (1, 2)
    np.testing.assert_allclose(scores, [1.0, 0.8, 0.7875])
    # Two inner splits, the second stopped after one epoch: count 2 is scored on the first alone,
    # and the pairs against it come from the first too.
    stopped = [_split(probe, [0.81, 0.79, 0.8, 0.8], [0.5, 0.5, 0.5, 0.5]), _split([2.0, 2.0], [1.0, 1.0])]
    epochs, lowest, scores = choose_dense_epochs(stopped, "one_se")
    np.testing.assert_allclose(scores, [1.5, 0.9, 0.5])
    assert (epochs, lowest) == (2, 2)


def test_the_epochs_rule_is_part_of_a_probe_based_heads_key_and_needs_a_probe():
    from fishcomp.config import key_payload

    # Left out, the rule is lowest, as before the setting existed: the keys of existing heads stay.
    assert "base_choice" not in key_payload(DenseHeadConfig(base=LinearHeadConfig()))
    one_se = key_payload(DenseHeadConfig(base=LinearHeadConfig(), base_choice="one_se"))
    assert one_se != key_payload(DenseHeadConfig(base=LinearHeadConfig())) and one_se["base_choice"] == "one_se"
    with pytest.raises(ValueError, match="base_choice chooses the epochs of dense layers on a probe"):
        DenseHeadConfig(base_choice="lowest")


def test_a_probe_base_needs_the_pooled_vector_of_cached_features():
    for kind in FAMILY:
        with pytest.raises(ValueError, match="pooled"):
            FAMILY[kind](base=LinearHeadConfig(), input="map") if kind != "bbox" else BboxHeadConfig(base=LinearHeadConfig())
    # Fine-tuning changes the features every step: a probe fitted once would not fit them.
    with pytest.raises(FishcompError, match="head.base fits a probe on cached features"):
        load_config(CONFIGS / "finetune.yaml", ["head.kind=dense", "head.base={kind: linear}"])


def _oof(work, name):
    folder = next((work / "train").glob(f"{name}-*"))
    return pd.read_csv(folder / "oof.csv"), pd.read_csv(folder / "metrics.csv")


def _train(config, data, work, capsys, *overrides):
    sets = [item for override in [*SMALL, *overrides] for item in ("--set", override)]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / config, "--data", data, "--work", work, *sets], capsys)
    assert code == 0, stderr
    return _oof(work, config.removesuffix(".yaml"))


CLASSES = ["ALB", "BET", "DOL", "LAG", "NoF", "OTHER", "SHARK", "YFT"]


def test_a_dense_head_on_a_probe_starts_as_the_probe_and_trains_away_from_it(tiny_data, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    probe_oof, probe_metrics = _train("linear.yaml", tiny_data, first, capsys, "head.inner_repeats=2")
    # The same folds, inner splits (two), strengths and rows as `linear.yaml`'s own folds, so the
    # same probe; at a learning rate of 1e-9 the dense layers stay ~1e-8 from zero.
    still_oof, still_metrics = _train("dense.yaml", tiny_data, first, capsys,
                                      "head.base={kind: linear, inner_repeats: 2}", "train.phases=[{epochs: 2, lr: 1.0e-9}]")
    # The probe predicts with its fitted weights in float64 arithmetic, the head through float32
    # layers: probabilities agree to float32 rounding of logits of size ~10 (1e-5), far below 1e-3.
    np.testing.assert_allclose(still_oof[CLASSES].to_numpy(), probe_oof[CLASSES].to_numpy(), atol=1e-3)
    # Each fold chose the same strength, recorded as the dense head's epoch-0 rows.
    chosen = lambda m: m[m.chosen.fillna(False).astype(bool)].groupby("fold").strength.first()  # noqa: E731
    pd.testing.assert_series_equal(chosen(still_metrics[still_metrics.epoch == 0]), chosen(probe_metrics))

    # The same cached features (one backbone pass for the whole test); other keys for the heads.
    shutil.copytree(first / "precompute", second / "precompute")
    probe_oof, _ = _train("linear.yaml", tiny_data, second, capsys)  # one inner split, as the head below
    trained_oof, trained_metrics = _train("dense.yaml", tiny_data, second, capsys, "head.base={kind: linear}")
    choice = trained_metrics[trained_metrics.chosen.fillna(False).astype(bool)].set_index("fold")
    # By default (head.base_choice lowest) each fold takes the count with the lowest inner log loss.
    assert (choice.dense_epochs == choice.dense_lowest_epochs).all()
    for fold, epochs in choice.dense_epochs.astype(int).items():
        trained = trained_metrics[(trained_metrics.fold == fold) & (trained_metrics.epoch > 0)]
        # Each fold trains exactly the epochs its inner split chose (0 to the schedule's 12)...
        assert 0 <= epochs <= 12 and len(trained) == epochs and (epochs == 0 or trained.epoch.max() == epochs)
        moved = np.abs(trained_oof.loc[trained_oof.fold == fold, CLASSES].to_numpy() - probe_oof.loc[probe_oof.fold == fold, CLASSES].to_numpy()).max()
        # ...and is its probe when that is 0. Adam's first step at 1e-3 moves every last-layer
        # weight with a gradient by exactly 1e-3: over 512 hidden units of size ~0.5 a logit moves
        # by ~0.1 (probabilities by well over 1e-3), against the still head's float32 ~1e-5.
        assert moved < 1e-3 if epochs == 0 else moved > 1e-3

    # The folds' checkpoints hold the probe too: `predict` on raw images gives the run's test predictions.
    sample = pd.read_csv(tiny_data / "sample_submission_stg1.csv").image.head(4).tolist()
    out = tmp_path / "predicted.csv"
    sets = [item for override in [*SMALL, "head.base={kind: linear}"] for item in ("--set", override)]
    code, _, stderr = run_cli(["predict", "-c", CONFIGS / "dense.yaml", *[tiny_data / "test_stg1" / n for n in sample], "--data", tiny_data,
                               "--work", second, "--out", out, *sets], capsys)
    assert code == 0, stderr
    folder = next((second / "train").glob("dense-*"))
    expected = pd.read_csv(folder / "test_stg1.csv").set_index("image").loc[sample]
    # As in the predict test of whole-image heads: float16 features, batches of other sizes.
    np.testing.assert_allclose(pd.read_csv(out).iloc[:, 1:].to_numpy(), expected.to_numpy(), atol=5e-3)


def test_the_report_draws_a_probe_based_heads_epochs_not_its_strength_choice(tmp_path):
    from PIL import Image

    from fishcomp import viz

    # Fold 2's inner split chose 0 epochs: it has only its choice rows (the title names it).
    choice = [{"fold": f, "epoch": 0, "strength": c, "inner_logloss": 1.0 + c, "chosen": c == 0.01} for f in (0, 1, 2) for c in (0.001, 0.01)]
    epochs = [{"fold": f, "epoch": e, "lr": 1e-3, "train_loss": 1.0 / e, "valid_loss": 1.1 / e, "valid_logloss": 1.2 / e}
              for f in (0, 1) for e in (1, 2, 3)]
    probe_only = pd.DataFrame([*choice, {"fold": 0, "epoch": 3, "strength": 0.01, "chosen": True, "valid_logloss": 1.0}])
    # The two kinds of figure: the probe's strength plot (6 inches wide), the epochs' curves (11).
    widths = {name: Image.open(viz.training_curves(frame, tmp_path / f"{name}.png")).size[0]
              for name, frame in (("probe", probe_only), ("dense_on_probe", pd.DataFrame([*choice, *epochs])))}
    assert widths["dense_on_probe"] > 1.5 * widths["probe"]


def _predict_matches_the_runs_test_predictions(config, data, work, overrides, tmp_path, capsys):
    sample = pd.read_csv(data / "sample_submission_stg1.csv").image.head(4).tolist()
    out = tmp_path / "predicted.csv"
    sets = [item for override in [*SMALL, *overrides] for item in ("--set", override)]
    code, _, stderr = run_cli(["predict", "-c", CONFIGS / config, *[data / "test_stg1" / n for n in sample], "--data", data,
                               "--work", work, "--out", out, *sets], capsys)
    assert code == 0, stderr
    expected = pd.read_csv(next((work / "train").glob(f"{config.removesuffix('.yaml')}-*")) / "test_stg1.csv").set_index("image").loc[sample]
    # As in the predict test of whole-image heads: float16 features, batches of other sizes.
    np.testing.assert_allclose(pd.read_csv(out).iloc[:, 1:].to_numpy(), expected.to_numpy(), atol=5e-3)


def test_a_leakage_head_on_a_probe_trains_the_epochs_one_se_chose_and_predicts_from_its_checkpoints(tiny_data, tmp_path, capsys):
    work, overrides = tmp_path / "work", ["head.base={kind: linear}", "head.base_choice=one_se"]
    oof, metrics = _train("leakage.yaml", tiny_data, work, capsys, *overrides)
    choice = metrics[metrics.chosen.fillna(False).astype(bool)].set_index("fold")
    assert sorted(choice.index) == sorted(oof.fold.unique())
    # one_se: never more epochs than the lowest inner log loss's, never a lower inner log loss.
    assert (choice.dense_epochs <= choice.dense_lowest_epochs).all()
    assert (choice.dense_inner_logloss >= choice.dense_lowest_inner_logloss).all()
    for fold, epochs in choice.dense_epochs.astype(int).items():
        assert len(metrics[(metrics.fold == fold) & (metrics.epoch > 0)]) == epochs
    # Its checkpoints need each image's size: `predict` reads it from the photos.
    _predict_matches_the_runs_test_predictions("leakage.yaml", tiny_data, work, overrides, tmp_path, capsys)


def test_a_bbox_head_left_at_its_probe_says_its_boxes_never_trained_and_scores_them(tiny_data, tmp_path, capsys):
    # At a learning rate of 10 one Adam step wrecks the dense layers' predictions, so every
    # fold's inner split chooses 0 epochs: the classification is the probe, the box layer untrained.
    work, overrides = tmp_path / "work", ["head.input=pooled", "head.base={kind: linear}", "train.phases=[{epochs: 2, lr: 10.0}]"]
    sets = [item for override in [*SMALL, *overrides] for item in ("--set", override)]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "bbox.yaml", "--data", tiny_data, "--work", work, *sets], capsys)
    assert code == 0, stderr
    folder = next((work / "train").glob("bbox-*"))
    metrics, summary = pd.read_csv(folder / "metrics.csv"), json.loads((folder / "summary.json").read_text())
    assert (metrics.epoch == 0).all() and summary["kept_epochs"] == [0] * summary["folds"]
    assert stderr.count("chose 0 epochs on the probe, so its box output never trained") == summary["folds"]
    # The boxes it wrote are scored, not left out: the IoU of each fold's out-of-fold boxes.
    chosen = metrics[metrics.chosen.fillna(False).astype(bool)]
    assert chosen.valid_iou.notna().all() and 0 <= summary["valid_iou"] <= 1
    assert summary["valid_iou"] == pytest.approx(chosen.valid_iou.mean())
    _predict_matches_the_runs_test_predictions("bbox.yaml", tiny_data, work, overrides, tmp_path, capsys)
