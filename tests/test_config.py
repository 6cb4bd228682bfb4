from pathlib import Path

import pytest
from helpers import CONFIGS, run_cli

from fishcomp.config import (
    cache_key,
    dump_yaml,
    key_payload,
    load_config,
    parse_override,
)
from fishcomp.context import Context
from fishcomp.errors import FishcompError
from fishcomp.graph import get_stage
from fishcomp.pipeline import resolver

ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    loaded = load_config(path)
    assert loaded.config.trains or loaded.config.ensemble is not None
    for member in member_configs(loaded):
        assert member.config.trains


def member_configs(loaded, overrides=()):
    return resolver(Context(data_dir=Path("unused"), work_dir=Path("unused"), overrides=list(overrides))).members(loaded)


def train_params(loaded):
    return get_stage("train").params(None, loaded)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("head: {kind: dense, dropuot: 0.5}\n", r"c.yaml: unknown key `head.dropuot`; did you mean dropout\?"),
        ("train: {batch_size: many}\n", r"c.yaml: `train.batch_size`: must be a whole number, got 'many'"),
        ("head: {kind: dense, dropout: 1.5}\n", r"c.yaml: `head.dropout`: must be < 1.0, got 1.5"),
        ("head: {kind: transformer}\n", r"c.yaml: `head.kind`: unknown kind `transformer` \(choose from linear, dense,"),
        ("head: {kind: densee}\n", r"c.yaml: `head.kind`: unknown kind `densee`; did you mean dense\?"),
        ("split: {kind: kfld}\n", r"c.yaml: `split.kind`: `kfld` is not one of holdout, kfold, group_kfold; did you mean kfold\?"),
        ("trian: {}\n", r"c.yaml: unknown key `trian`"),
        ("- just\n- a list\n", r"c.yaml: a config must be a mapping"),
        ("head: [unclosed\n", r"c.yaml: line \d+ is not valid YAML"),
    ],
)
def test_config_errors_are_one_line_and_name_key_and_file(tmp_path, text, message):
    with pytest.raises(FishcompError, match=message) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FishcompError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_an_artifact_folder_loads_its_saved_config_and_other_folders_say_what_to_name(tmp_path, capsys):
    run = tmp_path / "train" / "dense-0123456789abcdef"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(load_config(CONFIGS / "dense.yaml").config.model_dump(mode="json")))
    assert load_config(run).path == run / "config.yaml" and load_config(run).config == load_config(CONFIGS / "dense.yaml").config
    backbone_pass = tmp_path / "precompute" / "efficientnet_lite0-224x224-0123456789abcdef"
    backbone_pass.mkdir(parents=True)
    (backbone_pass / "config.yaml").write_text("backbone: efficientnet_lite0\nsize: [224, 224]\n")
    for folder, message in ((backbone_pass, "holds its stage's own settings only"), (tmp_path, "a folder with no config.yaml")):
        code, _, stderr = run_cli(["config", "-c", folder], capsys)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "head.kind.x=1"])
def test_malformed_set(tmp_path, bad):
    path = write(tmp_path, "head: {kind: dense}\n")
    with pytest.raises(FishcompError, match="--set"):
        load_config(path, [bad])


def test_a_set_value_that_is_not_yaml_is_a_one_line_error_that_points_at_it(tmp_path):
    path = write(tmp_path, "head: {kind: dense}\n")
    with pytest.raises(FishcompError, match=r"--set 'train.phases=\[\{epochs: 2': the value is not valid YAML: expected ',' or '\}'.* at column 12 of the value") as info:
        load_config(path, ["train.phases=[{epochs: 2"])
    assert "\n" not in str(info.value)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "head: {kind: dense}\n")
    loaded = load_config(path, ["train.batch_size=16", "precompute.size=[360, 640]", "head.dropout=0.25"])
    assert loaded.config.train.batch_size == 16
    assert loaded.config.precompute.size == (360, 640)
    assert loaded.config.head.dropout == 0.25
    with pytest.raises(FishcompError, match=r"--set 'train.btach_size=16' \(on .*c.yaml\): unknown key `train.btach_size`; did you mean batch_size\?"):
        load_config(path, ["train.btach_size=16"])
    dense = load_config(CONFIGS / "dense.yaml", ["train.phases.0.lr=3e-4", "train.phases.-1.epochs=2"])
    assert [(p.epochs, p.lr) for p in dense.config.train.phases] == [(6, 3e-4), (2, 1e-4)]
    with pytest.raises(FishcompError, match="train.phases has 2 item"):
        load_config(CONFIGS / "dense.yaml", ["train.phases.2.lr=1"])
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)


def test_extends_holds_only_changes():
    loaded = load_config(CONFIGS / "dense_360x640.yaml")
    base = load_config(CONFIGS / "dense.yaml")
    assert loaded.config.precompute.size == (360, 640)
    assert loaded.config.head == base.config.head
    assert loaded.config.train == base.config.train
    assert loaded.name == "dense_360x640"


def test_runtime_fields_stay_out_of_keys_and_real_ones_in():
    base = load_config(CONFIGS / "dense.yaml")
    more_workers = load_config(CONFIGS / "dense.yaml", ["precompute.workers=7", "precompute.device=cpu", "train.device=cpu"])
    other_size = load_config(CONFIGS / "dense.yaml", ["precompute.size=[128,128]"])
    assert key_payload(base.config.precompute) == key_payload(more_workers.config.precompute)
    assert cache_key("precompute", key_payload(base.config.precompute)) != cache_key(
        "precompute", key_payload(other_size.config.precompute)
    )
    assert train_params(base) == train_params(more_workers)
    assert train_params(base) != train_params(load_config(CONFIGS / "dense.yaml", ["head.dropout=0.3"]))
    assert train_params(base) != train_params(load_config(CONFIGS / "dense.yaml", ["split.seed=1"]))


def test_an_ensemble_weight_does_not_touch_member_configs():
    loaded = load_config(CONFIGS / "pipeline.yaml", ["ensemble.members=[{config: dense.yaml, weight: 3}]"])
    members = member_configs(loaded)
    assert [m.name for m in members] == ["dense"]
    assert train_params(members[0]) == train_params(load_config(CONFIGS / "dense.yaml"))


def test_ensemble_and_head_are_exclusive(tmp_path):
    with pytest.raises(FishcompError, match="either `ensemble` or `head`"):
        load_config(write(tmp_path, "head: {kind: dense}\nensemble: {members: [{config: x.yaml}]}\n"))


def test_member_paths_resolve_against_the_config(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "head: {kind: dense}\n", "m.yaml")
    loaded = load_config(write(tmp_path, "ensemble: {members: [{config: sub/m.yaml}]}\n"))
    assert member_configs(loaded)[0].path == Path(tmp_path / "sub" / "m.yaml")
    missing = load_config(write(tmp_path, "ensemble: {members: [{config: gone.yaml}]}\n", "e.yaml"))
    with pytest.raises(FishcompError, match="ensemble.members of .*e.yaml: config file not found"):
        member_configs(missing)


def test_an_optional_feature_left_off_does_not_enter_the_key():
    from fishcomp.config import PseudoConfig, TrainConfig, key_payload

    plain = TrainConfig()
    assert "pseudo" not in key_payload(plain)  # so adding the option kept every old artifact valid
    with_pseudo = TrainConfig(pseudo=PseudoConfig(source="a.yaml"))
    payload = key_payload(with_pseudo)
    # The source is keyed by its artifact's key (added by the train stage), not by its path.
    assert payload["pseudo"] == {"proportion": 0.25, "splits": ["test_stg1"]}


def test_a_comma_list_sweeps_every_combination_and_brackets_stay_one_value():
    from fishcomp.config import expand_sweep

    runs = expand_sweep(["train.phases.0.lr=1e-3,3e-4", "precompute.size=[360,640]", "head.dropout=0.5,0.6"])
    assert len(runs) == 4 and all("precompute.size=[360,640]" in r for r in runs)
    assert runs[0] == ["train.phases.0.lr=1e-3", "precompute.size=[360,640]", "head.dropout=0.5"]
    assert expand_sweep(["a=1"]) == [["a=1"]] and expand_sweep([]) == [[]]
