"""Pseudo-labelling: the MixIterator's batches, and that no validation image is ever trained on."""

import json

import numpy as np
import pytest
import yaml
from helpers import CONFIGS, TINY, run_cli

from fishcomp.training import folds as train_stage
from fishcomp.training.loop import mixed_batches


@pytest.mark.parametrize("n_train,n_pseudo,batch_size,proportion", [(100, 24, 32, 0.25), (7, 50, 4, 0.5), (64, 3, 16, 0.75)])
def test_mixed_batches_cover_train_once_and_keep_the_proportion(n_train, n_pseudo, batch_size, proportion):
    batches = list(mixed_batches(n_train, n_pseudo, batch_size, proportion, np.random.default_rng(0)))
    train = np.concatenate([b[0] for b in batches])
    pseudo = np.concatenate([b[1] for b in batches])
    assert sorted(train) == list(range(n_train))  # every train image exactly once per epoch
    assert pseudo.min() >= 0 and pseudo.max() < n_pseudo
    assert all(len(t) + len(p) <= batch_size for t, p in batches)
    share = len(pseudo) / (len(pseudo) + len(train))
    assert abs(share - proportion) < 0.1
    if len(pseudo) >= n_pseudo:
        assert set(pseudo) == set(range(n_pseudo))  # cycled through all of them, not a few repeated


def test_without_pseudo_images_batches_are_plain():
    batches = list(mixed_batches(10, 0, 4, 0.25, np.random.default_rng(0)))
    assert [len(t) for t, _ in batches] == [4, 4, 2] and all(len(p) == 0 for _, p in batches)


def _pseudo_config(tmp_path, source, extra=""):
    path = tmp_path / "dense_pseudo.yaml"
    path.write_text(
        f"extends: {CONFIGS / 'dense.yaml'}\nname: dense_pseudo\n"
        f"train:\n  pseudo: {{source: {source}, proportion: 0.25{extra}}}\n"
    )
    return path


def test_pseudo_labelling_trains_on_test_images_and_never_on_validation_ones(tiny_data, tmp_path, capsys, monkeypatch):
    seen = []
    real_fit = train_stage._fit_fold

    def spy_fit(loaded, fold, train_set, valid_set, *args, **kwargs):
        pseudo = args[-1] if len(args) > 7 else kwargs.get("pseudo")
        requested = {"train": [], "pseudo": []}
        for name, features in (("train", train_set), ("pseudo", pseudo[0] if pseudo else None)):
            if features is None:
                continue
            real_batch = features.batch

            def batch(positions, device, _real=real_batch, _name=name, _features=features, **kwargs):
                requested[_name].append(_features.rows[positions])
                return _real(positions, device, **kwargs)

            features.batch = batch
        result = real_fit(loaded, fold, train_set, valid_set, *args, **kwargs)
        seen.append((set(valid_set.rows), requested, pseudo))
        return result

    monkeypatch.setattr(train_stage, "_fit_fold", spy_fit)
    config = _pseudo_config(tmp_path, CONFIGS / "dense.yaml")
    args = ["train", "-c", config, "--data", tiny_data, "--work", tmp_path / "work"]
    for override in TINY:
        args += ["--set", override]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert len(seen) == 6  # 3 folds of the source, then 3 of the pseudo-labelled run
    source_folds, pseudo_folds = seen[:3], seen[3:]
    assert all(not requested["pseudo"] for _, requested, _ in source_folds)
    for valid_rows, requested, pseudo in pseudo_folds:
        trained_rows = set(np.concatenate(requested["train"]))
        assert trained_rows and not trained_rows & valid_rows
        assert len(pseudo[0]) == 24  # the 24 stage-1 test images, the pseudo set's own rows
        assert len(np.concatenate(requested["pseudo"])) > 0
        np.testing.assert_allclose(pseudo[1].sum(axis=1), 1.0, atol=1e-3)  # soft targets
    summary = json.loads(next((tmp_path / "work" / "train").glob("dense_pseudo-*/summary.json")).read_text())
    assert summary["pseudo"]["images"] == 24 and summary["pseudo"]["source"].startswith("dense-")
    assert summary["valid_logloss"] < summary["prior_logloss"]
    plain = json.loads(next((tmp_path / "work" / "train").glob("dense-*/summary.json")).read_text())
    assert plain["pseudo"] is None
    # Its saved config names the source by the source's artifact: run again from it, it is cached.
    artifact = next((tmp_path / "work" / "train").glob("dense_pseudo-*"))
    source = yaml.safe_load((artifact / "config.yaml").read_text())["train"]["pseudo"]["source"]
    assert source.startswith("../dense-") and (artifact / source).is_file()
    code, stdout, stderr = run_cli(["train", "-c", artifact / "config.yaml", "--data", tiny_data, "--work", tmp_path / "work"], capsys)
    assert code == 0 and "built" not in stdout and "cached" in stdout, stderr

    # The source is cached on the second run; a different source means a different artifact.
    monkeypatch.setattr(train_stage, "_fit_fold", real_fit)
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "built" not in stdout
    other = _pseudo_config(tmp_path, CONFIGS / "dense.yaml", ", splits: [test_stg1, test_stg2]")
    code, stdout, stderr = run_cli([*args[:2], other, *args[3:]], capsys)
    assert code == 0, stderr
    assert stdout.count("built") == 1
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "work" / "train").glob("dense_pseudo-*/summary.json")]
    assert sorted(s["pseudo"]["images"] for s in summaries) == [24, 36]


def test_a_pseudo_source_that_leads_back_to_itself_is_an_error(tiny_data, tmp_path, capsys):
    config = _pseudo_config(tmp_path, "dense_pseudo.yaml")
    code, _, stderr = run_cli(["train", "-c", config, "--data", tiny_data, "--work", tmp_path / "work"], capsys)
    assert code == 2 and "its references lead back to it: dense_pseudo.yaml -(train.pseudo.source)-> dense_pseudo.yaml" in stderr
    assert stderr.count("\n") == 1


def test_a_pseudo_source_that_is_missing_names_the_file(tiny_data, tmp_path, capsys):
    config = _pseudo_config(tmp_path, "nowhere.yaml")
    code, _, stderr = run_cli(["train", "-c", config, "--data", tiny_data, "--work", tmp_path / "work"], capsys)
    assert code == 2 and "train.pseudo.source" in stderr and "nowhere.yaml" in stderr
