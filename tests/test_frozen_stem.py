"""train.stem_epochs: a map head's normalisation and first convolution trained for that many
epochs, then frozen, the rest trained on their outputs computed once per fold."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CONFIGS, SMALL, run_cli

from fishcomp.config import load_config
from fishcomp.errors import FishcompError
from fishcomp.metrics import log_loss



def test_a_frozen_stem_serves_its_outputs_in_place_of_the_maps_and_gives_its_layers_back_unchanged():
    from fishcomp.models.heads.convolutional import map_input_norm
    from fishcomp.training.feature_sets import FeatureSet
    from fishcomp.training.frozen_stem import FrozenStem

    rng = np.random.default_rng(0)
    # 300 maps (two batches of stem outputs) with channel means and scales far from 0 and 1,
    # and an augmented copy of each.
    maps = (rng.normal(size=(300, 6, 4, 5)) * rng.uniform(0.5, 3, (1, 6, 1, 1)) + rng.uniform(-5, 5, (1, 6, 1, 1))).astype(np.float32)
    copy = maps + rng.normal(scale=0.1, size=maps.shape).astype(np.float32)
    train = FeatureSet(maps, np.arange(200), boxes=rng.uniform(size=(200, 4)), copies=[copy], copy_boxes=rng.uniform(size=(1, 200, 4)))
    valid = FeatureSet(maps, np.arange(200, 300))
    torch.manual_seed(0)
    norm, conv = map_input_norm(6), torch.nn.Conv2d(6, 3, 3, padding=1, bias=False)
    weight = conv.weight.detach().clone()
    with torch.no_grad():  # statistics the normalisation learnt in training
        norm.train()(torch.from_numpy(maps[:200]))
    statistics = norm.running_mean.clone(), norm.running_var.clone()
    stem = FrozenStem([norm, conv], "cpu", None, None)
    served = stem.freeze({"train": train, "valid": valid, "pseudo": None})

    assert served["pseudo"] is None and len(served["train"]) == 200 and served["train"].copy_count == 2
    np.testing.assert_array_equal(served["train"].boxes, train.boxes)

    def through_stem(x):
        normalised = torch.nn.functional.batch_norm(x, norm.running_mean, norm.running_var, eps=norm.eps)
        return torch.nn.functional.conv2d(normalised, conv.weight, padding=1)

    with torch.no_grad():
        x = torch.from_numpy(maps[200:210])
        expected = through_stem(x)
        got, _, _ = served["valid"].batch(np.arange(10), "cpu")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        copied, _, boxes = served["train"].batch(np.arange(3), "cpu", copies=np.array([1, 1, 0]))
        torch.testing.assert_close(copied[:2], through_stem(torch.from_numpy(copy[:2])), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(boxes.numpy()[:2], train.copy_boxes[0, :2])
        # Frozen, the layers let their input through (the head's own forward reads the outputs)...
        assert norm(expected) is expected and conv(expected) is expected
        stem.release()
        # ... and given back, they compute again, with the weights they had.
        norm.eval()
        torch.testing.assert_close(conv(norm(x)), expected)
    assert torch.equal(conv.weight, weight)
    assert torch.equal(norm.running_mean, statistics[0]) and torch.equal(norm.running_var, statistics[1])


PLAIN = ["precompute.tta=null", "train.mirror_copies=null"]


def _train(tiny_data, work, capsys, *overrides):
    # Without fcn.yaml's mirrored view (nor the training copies made of it): the epochs'
    # validation, which the test compares with the out-of-fold predictions, reads the original view only.
    sets = [arg for override in [*SMALL, "train.precision=fp32", *PLAIN, *overrides] for arg in ("--set", override)]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "fcn.yaml", "--data", tiny_data, "--work", work, *sets], capsys)
    assert code == 0, stderr
    return next((work / "train").glob("fcn-*"))


def test_the_stem_stops_where_it_was_frozen_and_the_layers_above_keep_training(tiny_data, tmp_path, capsys):
    two_phases = "train.phases=[{epochs: 2, lr: 1.0e-3}, {epochs: 2, lr: 1.0e-4}]"
    frozen = _train(tiny_data, tmp_path / "frozen", capsys, two_phases, "train.stem_epochs=2")
    # The same seed and batches for the first two epochs, and no more: where the stem stopped.
    first_two = _train(tiny_data, tmp_path / "first", capsys, "train.phases=[{epochs: 2, lr: 1.0e-3}]")
    for fold in range(3):
        after = torch.load(frozen / "checkpoints" / f"fold{fold}.pt", weights_only=True)["state_dict"]
        at_freeze = torch.load(first_two / "checkpoints" / f"fold{fold}.pt", weights_only=True)["state_dict"]
        # The same arithmetic up to the freeze, none after it: bit for bit.
        assert torch.equal(after["body.1.0.weight"], at_freeze["body.1.0.weight"])
        assert torch.equal(after["body.0.running_mean"], at_freeze["body.0.running_mean"])
        assert not torch.equal(after["body.1.1.weight"], at_freeze["body.1.1.weight"])  # the BN above it trained on
        assert not torch.equal(after["classifier.weight"], at_freeze["classifier.weight"])

    # The epochs after the freeze were validated on the stem's outputs; the out-of-fold
    # predictions come from the whole head on the raw maps. They are the same model (the frozen
    # normalisation uses its running statistics, as prediction does), so the last epoch's
    # validation log loss is the fold's out-of-fold log loss, up to float32 rounding.
    metrics, oof = pd.read_csv(frozen / "metrics.csv"), pd.read_csv(frozen / "oof.csv")
    classes = list(oof.columns[3:])
    for fold in range(3):
        mine = oof[oof.fold == fold]
        last = metrics[metrics.fold == fold].sort_values("epoch").iloc[-1]
        assert last.epoch == 4
        assert log_loss(mine.label.to_numpy(), mine[classes].to_numpy()) == pytest.approx(last.valid_logloss, abs=1e-4)


def test_stem_epochs_on_a_head_without_one_first_convolution_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(FishcompError, match="train.stem_epochs freezes a map head's first convolution: use fcn, resblock or inception with head.reduce, not dense"):
        load_config(CONFIGS / "dense.yaml", ["train.stem_epochs=3"])
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "inception.yaml", "--data", tmp_path, "--work", tmp_path, "--set", "train.stem_epochs=3"], capsys)
    assert code == 2 and "not inception" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert load_config(CONFIGS / "inception.yaml", ["train.stem_epochs=3", "head.reduce=64"]).config.train.stem_epochs == 3


def test_a_stem_whose_outputs_would_not_fit_in_memory_stays_unfrozen_and_says_so(tiny_data, tmp_path, capsys, monkeypatch):
    two_epochs = "train.phases=[{epochs: 1, lr: 1.0e-3}, {epochs: 1, lr: 1.0e-4}]"
    whole = _train(tiny_data, tmp_path / "whole", capsys, two_epochs, "train.stem_epochs=null")
    monkeypatch.setattr("fishcomp.training.folds.resident_budget", lambda: 1 << 20)  # 1 MiB
    sets = [arg for override in [*SMALL, "train.precision=fp32", *PLAIN, two_epochs, "train.stem_epochs=1"] for arg in ("--set", override)]
    code, _, stderr = run_cli(["train", "-c", CONFIGS / "fcn.yaml", "--data", tiny_data, "--work", tmp_path / "small", *sets], capsys)
    assert code == 0, stderr
    assert "fold 0: every layer trains every epoch (train.stem_epochs ignored): its outputs" in stderr and "would not fit" in stderr
    unfrozen = next((tmp_path / "small" / "train").glob("fcn-*"))
    mine = torch.load(unfrozen / "checkpoints" / "fold0.pt", weights_only=True)["state_dict"]
    reference = torch.load(whole / "checkpoints" / "fold0.pt", weights_only=True)["state_dict"]
    # The same training as without the setting (maps read from disk instead of memory: the same
    # float16 values converted to the same float32 batches): equal to float32 rounding.
    for name, tensor in reference.items():
        torch.testing.assert_close(mine[name], tensor, rtol=1e-5, atol=1e-6)
