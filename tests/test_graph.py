"""The declared stage graph: every registered stage keyed by exactly what it declares, stages that
never import each other, no import cycle anywhere, and reference loops caught before any work."""

import ast
from pathlib import Path

import pytest
from helpers import CONFIGS, run_cli
from pydantic import BaseModel

import fishcomp.stages  # noqa: F401  (registers every stage)
from fishcomp.config import NOT_IN_KEY, load_config
from fishcomp.context import Context
from fishcomp.graph import get_stage, list_stages

PACKAGE = Path(fishcomp.stages.__file__).resolve().parents[1]


# -- imports ----------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every fishcomp module a file imports, at the top or inside a function (lazy imports)."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: the module a.b.c when c is one, else a.b itself.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_no_stage_module_imports_another_stage():
    stage_files = [p for p in (PACKAGE / "stages").glob("*.py") if p.name != "__init__.py"]
    stage_modules = {_module_name(p) for p in stage_files} | {"fishcomp.stages"}
    assert len(stage_files) >= len(list_stages())
    for path in stage_files:
        others = _imports(path) & (stage_modules - {_module_name(path)})
        assert not others, f"{path.name} imports {sorted(others)}; ask the resolver for the node instead"


def test_the_package_has_no_import_cycle():
    graph = {_module_name(p): _imports(p) - {_module_name(p)} for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# -- keys -------------------------------------------------------------------------------------------


def _leaves(model: BaseModel, prefix: str = "", runtime: bool = False):
    """(dotted path, value, runtime-only) of every field, descending into sections."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        extra = field.json_schema_extra
        only_runtime = runtime or (isinstance(extra, dict) and bool(extra.get(NOT_IN_KEY)))
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _leaves(value, path + ".", only_runtime)
        elif value is not None:
            yield path, value, only_runtime


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (value[0] + 1, *value[1:])
    if isinstance(value, list):
        return [*value, value[0]] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "x": 1}
    raise TypeError(type(value))


def _changed(model: BaseModel, path: list[str], value):
    """A copy of `model` with the field at `path` set, unvalidated: keys are computed from any value."""
    head, *rest = path
    update = _changed(getattr(model, head), rest, value) if rest else value
    return model.model_copy(update={head: update})


def _expected_in_key(path: str, runtime: bool, declares: tuple[str, ...]) -> bool:
    """A field named exactly is in the key even when the schema marks it runtime-only (that mark
    is about its own section's artifact: `precompute.tta.combine` is read by training only); a
    field under a declared section is, unless runtime-only."""
    return path in declares or (not runtime and any(path.startswith(d + ".") for d in declares))


KEY_CASES = [
    ("precompute", "dense_aug.yaml", []),
    ("crops", "crops.yaml", []),
    ("train", "pseudo.yaml", ["precompute.tta={views: 3}"]),
    ("train", "crops.yaml", []),
    ("ensemble", "pipeline.yaml", []),
    ("submit", "pipeline.yaml", []),
    ("calibrate", "dense.yaml", ["calibrate={}"]),
]


def test_every_registered_stage_has_a_key_case():
    assert {stage for stage, _, _ in KEY_CASES} == set(list_stages())


@pytest.mark.parametrize("stage_name, config, overrides", KEY_CASES, ids=[f"{s}-{c}" for s, c, _ in KEY_CASES])
def test_a_stage_key_changes_with_each_field_it_declares_and_no_other(stage_name, config, overrides, tiny_data):
    stage = get_stage(stage_name)
    ctx = Context(data_dir=tiny_data, work_dir=tiny_data / "unused")
    loaded = load_config(CONFIGS / config, overrides)
    base = stage.params(ctx, loaded)
    checked_declared = 0
    for path, value, runtime in _leaves(loaded.config):
        other = ("cpu" if value != "cpu" else "auto") if path.endswith(".device") else _other_value(value)
        changed = loaded.model_copy(update={"config": _changed(loaded.config, path.split("."), other)})
        moved = stage.params(ctx, changed) != base
        if _expected_in_key(path, runtime, stage.declares):
            assert moved, f"{stage_name} declares {path}, but its key does not change with it"
            checked_declared += 1
        else:
            assert not moved, f"{stage_name} does not declare {path}, but its key changes with it"
    assert checked_declared >= 1


def test_a_blends_key_is_its_members_not_the_files_that_name_them(tiny_data, tmp_path):
    """A member renamed (or named by its artifact's saved config) is the same member; the blend
    is the same artifact. Its weights stay in the key, in the order of the members it blends."""
    from fishcomp.pipeline import resolver

    (tmp_path / "renamed_dense.yaml").write_text((CONFIGS / "dense.yaml").read_text())

    def blend(first: Path, weights=(1, 1)) -> str:
        config = tmp_path / "pair.yaml"
        config.write_text(f"ensemble:\n  members:\n    - {{config: {first}, weight: {weights[0]}}}\n"
                          f"    - {{config: {CONFIGS / 'linear.yaml'}, weight: {weights[1]}}}\n")
        return resolver(Context(data_dir=tiny_data, work_dir=tmp_path / "work")).plan("ensemble", load_config(config)).key

    assert blend(CONFIGS / "dense.yaml") == blend(tmp_path / "renamed_dense.yaml")
    assert blend(CONFIGS / "dense.yaml", (2, 1)) != blend(CONFIGS / "dense.yaml")
    assert blend(CONFIGS / "dense_probe.yaml") != blend(CONFIGS / "dense.yaml")


def test_a_fit_key_leaves_the_test_images_out_and_nothing_else(tiny_data, tmp_path):
    """What a build for other test images may take from an earlier one (`Stage.fit_params`): every
    node down to the crop classifier keeps its fit key when stage 2's photos are added (its key
    does not), and loses it to a touched train photo or a changed setting. A head trained on
    pseudo-labels (test predictions) has none."""
    import os
    import shutil

    from fishcomp.pipeline import resolver

    def nodes(data: Path, overrides=(), config="crops.yaml"):
        plan = resolver(Context(data_dir=data, work_dir=tmp_path / "work"))
        return {(n.stage.name, n.name): n for n in plan.walk(plan.plan("train", load_config(CONFIGS / config, list(overrides))))}

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("test_stg2", "sample_submission_stg2.csv"))
    stage1, both = nodes(data), nodes(tiny_data)
    assert stage1.keys() == both.keys() and {stage for stage, _ in both} == {"precompute", "train", "crops"}
    for name, node in both.items():
        assert node.key != stage1[name].key and node.fit_key == stage1[name].fit_key is not None, name
    assert nodes(tiny_data, ["train.phases.0.lr=0.0005"])[("train", "crops")].fit_key != both[("train", "crops")].fit_key
    photo = next((data / "train").rglob("*.jpg"))
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    assert all(node.fit_key != stage1[name].fit_key for name, node in nodes(data).items())
    pseudo = nodes(tiny_data, config="pseudo.yaml")
    assert pseudo[("train", "pseudo")].fit_key is None and pseudo[("precompute", "pseudo")].fit_key is not None


# -- references ------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("field", ["nof", "boxes", "pseudo"])
def test_a_reference_loop_is_one_line_before_anything_is_built(field, tiny_data, tmp_path, capsys):
    if field == "nof":
        body = "extends: {base}\ncrops: {{boxes: {configs}/bbox_grid.yaml, nof: {{whole: {other}}}}}\n"
        base = CONFIGS / "crops.yaml"
    elif field == "boxes":
        body = "extends: {base}\nhead: {{kind: bbox, input: pooled}}\ncrops: {{boxes: {other}}}\n"
        base = CONFIGS / "crops.yaml"
    else:
        body = "extends: {base}\ntrain: {{pseudo: {{source: {other}}}}}\n"
        base = CONFIGS / "dense.yaml"
    a = _write(tmp_path / "a.yaml", body.format(base=base, configs=CONFIGS, other="b.yaml"))
    _write(tmp_path / "b.yaml", body.format(base=base, configs=CONFIGS, other="a.yaml"))
    work = tmp_path / "work"
    code, _, stderr = run_cli(["run", "-c", a, "--data", tiny_data, "--work", work], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "its references lead back to it: a.yaml" in stderr and "b.yaml" in stderr
    assert not work.exists() or not any(work.rglob("manifest.json"))
    code, _, stderr = run_cli(["dag", "-c", a, "--data", tiny_data, "--work", work], capsys)
    assert code == 2 and "lead back to it" in stderr


def test_a_config_with_calibrate_and_no_submit_section_runs_up_to_its_calibrate_stage(tiny_data, tmp_path, capsys):
    """`run` builds the deepest stage a config names; calibrate is one (it was skipped once, and
    the run ended at the uncalibrated blend without a word)."""
    members = "".join(f"    - {{config: {CONFIGS / name}}}\n" for name in ("linear.yaml", "dense_probe.yaml"))
    config = _write(tmp_path / "two.yaml", f"name: two\nensemble:\n  members:\n{members}calibrate: {{}}\n")
    code, stdout, stderr = run_cli(["dag", "-c", config, "--data", tiny_data, "--work", tmp_path, "--format", "csv"], capsys)
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1].split(",")[1:3] == ["calibrate", "two"]
