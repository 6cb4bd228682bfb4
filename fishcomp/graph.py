"""The declared stage graph: every stage registered once with its inputs, its key and its build.

Like DVC's `dvc.yaml` stages (deps, params, outs), in code. A `Stage` says which upstream nodes a
config needs (`inputs`), exactly which slice of the config goes into its cache key (`params`,
listed in `declares`), how to build its artifact into a temporary folder (`build`) and how to
describe a finished one in a line (`describe`). Stages never import each other: they ask the
`Resolver` for their inputs by stage name, and the resolver

- turns a config into nodes (`target`: the deepest stage the config names, decided here alone),
- loads every referenced config (ensemble members, pseudo-label sources, box sources, NoF judges)
  with one rule for `--set`, and checks every reference for loops in one place,
- memoises nodes and artifacts within a run, and builds the superset of backbone passes,
- looks an artifact up without building it (`status`, `find`), and builds (`build`), recording
  each node's fit key (`Stage.fit_params`): what an artifact built for other test images shares
  with it, so stage 2's photos arriving retrain nothing.

`fishcomp dag` prints the nodes `fishcomp run` would build, without building anything.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fishcomp.cache import FIT_KEY, MANIFEST, Artifact, damage
from fishcomp.config import MEMBER_SECTIONS, LoadedConfig, cache_key, load_config, write_run_config
from fishcomp.console import stage_line, warn
from fishcomp.context import Context
from fishcomp.errors import FishcompError


class Stage(ABC):
    """One kind of artifact. Subclasses set `name` and `declares` and implement the methods."""

    name: ClassVar[str]
    # The config fields (dotted; a section means every field in it) that `params` reads: the
    # key test checks that each changes the key and that nothing else does.
    declares: ClassVar[tuple[str, ...]] = ()
    # The config section a config needs for this stage to apply (None: every config has it).
    section: ClassVar[str | None] = None
    # Built by every rank of a torchrun job together (each its share), or by one rank while the
    # others wait at the cache lock and reuse its artifact.
    together: ClassVar[bool] = False
    # One line for `fishcomp dag` and the README.
    summary: ClassVar[str] = ""
    # Writes the run's resolved config beside its artifact (`config.yaml`: what `runs` and `diff`
    # compare, and what reruns the artifact), its references pointing at the artifacts they built.
    saves_config: ClassVar[bool] = False
    # Its build takes the train-image part of an earlier artifact of the same fit key (see
    # `fit_params`) instead of redoing it.
    reuses_fit: ClassVar[bool] = False

    def inputs(self, resolver: Resolver, loaded: LoadedConfig, **request: Any) -> dict[str, Node | list[Node]]:
        return {}

    @abstractmethod
    def params(self, ctx: Context, loaded: LoadedConfig, **request: Any) -> dict:
        """Exactly what of the config (and of the data) determines the artifact, besides its inputs."""

    def fit_params(self, ctx: Context, loaded: LoadedConfig, params: dict) -> dict | None:
        """`params` with the test images left out, for a stage whose artifact splits into a part
        fitted on the train images and predictions of the test images: the artifact's `fit_key`
        is made of these and its inputs' fit keys, and a new build of the same fit key (the test
        images changed: stage 2's photos arrived) takes that part from an earlier artifact instead
        of redoing it (`Cache.donor`). None (the default): every part depends on the test images."""
        return None

    def earlier(self, ctx: Context, node: Node) -> Artifact | None:
        """The earlier artifact whose train part a build of `node` takes (`reuses_fit`), if any."""
        return ctx.cache.donor(self.name, node.fit_key, node.key) if self.reuses_fit else None

    def label(self, loaded: LoadedConfig, **request: Any) -> str:
        return loaded.name

    @abstractmethod
    def build(self, ctx: Context, node: Node, inputs: dict[str, Any], tmp: Path) -> dict | None:
        """Write the artifact's files into `tmp`; may return facts for the manifest."""

    def describe(self, artifact: Artifact) -> str:
        return ""

    def references(self, resolver: Resolver, node: Node) -> dict[str, Node | Path]:
        """The config fields this stage resolved to upstream nodes (dotted; list items by index,
        `ensemble.members.0.config`): the node each one built, or the referenced file where no
        node did (a member the data could not train)."""
        return {}

    def after(self, ctx: Context, node: Node, artifact: Artifact) -> None:
        """Checks that apply to a cached artifact as much as to a new one (e.g. unreadable test images)."""

    def prefer(self, resolver: Resolver, loaded: LoadedConfig, request: dict) -> dict:
        """The request to serve instead of `request` when a superset artifact does the job (one
        backbone pass serving pooled-only and map consumers alike). Default: as asked."""
        return request


_STAGES: dict[str, Stage] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.name in _STAGES:
        raise ValueError(f"stage {cls.name} is registered twice")
    _STAGES[cls.name] = cls()
    return cls


def list_stages() -> list[str]:
    return list(_STAGES)


def get_stage(name: str) -> Stage:
    try:
        return _STAGES[name]
    except KeyError:
        raise FishcompError(f"unknown stage `{name}` (registered: {', '.join(_STAGES) or 'none: import fishcomp.stages'})") from None


@dataclass(eq=False)
class Node:
    stage: Stage
    loaded: LoadedConfig
    inputs: dict[str, Node | list[Node]]
    params: dict
    key: str
    label: str
    request: dict = field(default_factory=dict)
    # What the artifact's train-image part depends on (see `Stage.fit_params`); None where nothing
    # of it can be taken from an artifact built for other test images.
    fit_key: str | None = None

    @property
    def name(self) -> str:
        return self.loaded.name

    def upstream(self) -> list[Node]:
        found = []
        for value in self.inputs.values():
            found += value if isinstance(value, list) else [value]
        return found

    def input_keys(self) -> dict:
        return {name: [n.key for n in value] if isinstance(value, list) else value.key for name, value in self.inputs.items()}


def node_key(stage: Stage, params: dict, inputs: dict[str, Node | list[Node]]) -> str:
    keys = {name: [n.key for n in value] if isinstance(value, list) else value.key for name, value in inputs.items()}
    return cache_key(stage.name, params, keys)


def _fit_key(ctx: Context, node: Node) -> str | None:
    fitted = node.stage.fit_params(ctx, node.loaded, node.params)
    if fitted is None or any(n.fit_key is None for n in node.upstream()):
        return None
    upstream = {name: [n.fit_key for n in value] if isinstance(value, list) else value.fit_key for name, value in node.inputs.items()}
    return cache_key(node.stage.name, {"fit": fitted}, upstream)


# Which stage a config ends in, deepest first: decided here and nowhere else.
_TARGETS: tuple[tuple[str, Callable[[LoadedConfig], bool]], ...] = (
    ("submit", lambda loaded: loaded.config.submit is not None),
    ("calibrate", lambda loaded: loaded.config.calibrate is not None),
    ("ensemble", lambda loaded: loaded.config.ensemble is not None),
    ("train", lambda loaded: loaded.config.trains),
    ("precompute", lambda loaded: True),
)


# In the manifest of an artifact whose saved config names its references by the artifacts they
# built (those from before name the files they were run from, relative to those files' folder).
SELF_CONTAINED = "config_self_contained"


def _saved_config_self_contained(artifact: Artifact) -> bool:
    try:
        return bool(json.loads(artifact.file(MANIFEST).read_text()).get(SELF_CONTAINED))
    except (OSError, ValueError):
        return False


class Resolver:
    """Turns configs into nodes and nodes into artifacts, once each per run."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._nodes: dict[tuple, Node] = {}
        self._artifacts: dict[str, Artifact] = {}
        self._stack: list[tuple[str, Path, str]] = []  # (stage, config file, the field that led here)
        # Keys of every node this run will build (see `plan`).
        self.planned: set[str] = set()
        self._skips_said: set[tuple[Path, Path]] = set()

    # -- configs -----------------------------------------------------------------------------------

    def reference(self, loaded: LoadedConfig, relative: str, field: str) -> LoadedConfig:
        """The config another one names in `field` (relative to the naming file), loaded with the
        user's `--set` values for model sections, except those of the section that names it,
        which belong to the naming run alone. The one rule for every reference."""
        path = loaded.path.parent / relative
        own_section = field.rsplit(".", 1)[0]
        overrides = [
            o for o in self.ctx.overrides
            if o.split(".", 1)[0].strip() in MEMBER_SECTIONS and not o.replace(" ", "").startswith(own_section + ".")
        ]
        try:
            return load_config(path, overrides)
        except FishcompError as exc:
            raise FishcompError(f"{field} of {loaded.path}: {exc}") from exc

    def members(self, loaded: LoadedConfig) -> list[LoadedConfig]:
        """The single-model configs an ensemble names and the data can train, or the config itself
        when it trains. A member whose crops are cut at a box head's boxes is skipped, with a
        warning, when the data has train images and none of them has a box: that head would
        never learn where the fish are, and its crops would cost a backbone pass to add noise to
        the blend."""
        if loaded.config.ensemble is None:
            return [loaded] if loaded.config.trains else []
        kept, skipped = self.ensemble_members(loaded)
        for config, reason in skipped:
            if (loaded.path, config.path) not in self._skips_said:
                self._skips_said.add((loaded.path, config.path))
                warn(f"ensemble   [{loaded.name}] member {config.name} skipped: {reason}")
        if not kept:
            raise FishcompError(f"{loaded.path}: no ensemble member can train on this data (see the warnings above)")
        return [config for _, config in kept]

    def ensemble_members(self, loaded: LoadedConfig) -> tuple[list[tuple[Any, LoadedConfig]], list[tuple[LoadedConfig, str]]]:
        """An ensemble's members as `members` sorts them: ((its `ensemble.members` entry, its
        config) of each kept one, in order; (config, why) of each skipped one)."""
        kept, skipped = [], []
        for member in loaded.config.ensemble.members:
            config = self.reference(loaded, member.config, "ensemble.members")
            if not config.config.trains:
                raise FishcompError(f"{config.path}: an ensemble member must train a head (needs `head:`)")
            reason = self._unusable(config)
            if reason is None:
                kept.append((member, config))
            else:
                skipped.append((config, reason))
        return kept, skipped

    def _unusable(self, member: LoadedConfig) -> str | None:
        crops = member.config.crops
        if crops is None or not (self.ctx.data_dir / "train").is_dir():
            return None
        source = self.reference(member, crops.boxes, "crops.boxes")
        if source.config.head is None or source.config.head.kind != "bbox":
            return None  # boxes read off a classifier's heatmaps need no annotations
        if any(self.ctx.annotations(member.config.data).boxes.values()):
            return None
        return (f"no train image has a box (no *_labels.json in {self.ctx.annotations_dir(member.config.data)}), "
                f"so its box source {source.name} could not learn where the fish are")

    # -- nodes -------------------------------------------------------------------------------------

    def target(self, loaded: LoadedConfig) -> Node:
        """The deepest stage the config names: what `fishcomp run` builds."""
        stage = next(stage for stage, applies in _TARGETS if applies(loaded))
        return self.plan(stage, loaded)

    def plan(self, stage: str, loaded: LoadedConfig) -> Node:
        """The node with the whole run's graph in view: a first pass finds every artifact the run
        will build, so that a request a superset serves (see `Stage.prefer`) takes that superset
        even when it is planned later in the run than the request."""
        first = self.node(stage, loaded)
        planned = {n.key for n in self.walk(first)}
        if planned <= self.planned:
            return first
        self.planned |= planned
        self._nodes.clear()
        return self.node(stage, loaded)

    def is_planned_or_cached(self, stage: str, key: str) -> bool:
        return key in self.planned or self.ctx.cache.find(stage, key) is not None

    def node(self, stage_name: str, loaded: LoadedConfig, via: str = "", **request: Any) -> Node:
        """The node of `stage_name` for this config. `via`: the config field that led here (for
        the loop message); `request`: what the asking stage needs of it (e.g. the spatial map)."""
        stage = get_stage(stage_name)
        request = stage.prefer(self, loaded, request)
        here = (stage_name, loaded.path.resolve())
        if any((s, p) == here for s, p, _ in self._stack):
            start = next(i for i, (s, p, _) in enumerate(self._stack) if (s, p) == here)
            loop = self._stack[start:]
            steps = loop[0][1].name + "".join(f" -({v})-> {p.name}" for _, p, v in loop[1:]) + f" -({via})-> {loaded.path.name}"
            raise FishcompError(f"{loaded.path}: its references lead back to it: {steps}")
        memo = (stage_name, here[1], json.dumps(loaded.config.model_dump(mode="json"), sort_keys=True), json.dumps(request, sort_keys=True))
        if memo in self._nodes:
            return self._nodes[memo]
        self._stack.append((stage_name, loaded.path.resolve(), via))
        try:
            inputs = stage.inputs(self, loaded, **request)
        finally:
            self._stack.pop()
        params = stage.params(self.ctx, loaded, **request)
        node = Node(stage, loaded, inputs, params, node_key(stage, params, inputs), stage.label(loaded, **request), dict(request))
        node.fit_key = _fit_key(self.ctx, node)
        self._nodes[memo] = node
        return node

    def walk(self, root: Node) -> list[Node]:
        """Every node `root` needs, inputs before the nodes that read them, each once."""
        order, seen = [], set()

        def visit(node: Node) -> None:
            # Two configs can lead to one artifact (a superset pass, a shared member): once.
            if (node.stage.name, node.key) in seen:
                return
            seen.add((node.stage.name, node.key))
            for upstream in node.upstream():
                visit(upstream)
            order.append(node)

        visit(root)
        return order

    # -- artifacts ---------------------------------------------------------------------------------

    def find(self, node: Node) -> Artifact | None:
        """The finished artifact of a node, without building anything."""
        found = self.ctx.cache.find(node.stage.name, node.key)
        return Artifact(node.stage.name, node.key, found, built=False) if found else None

    def status(self, node: Node) -> str:
        if node.key in self._artifacts or self.find(node) is not None:
            return "cached"
        stage_dir = self.ctx.cache.root / node.stage.name
        if stage_dir.is_dir() and any(damage(c) for c in stage_dir.glob(f"*-{node.key}") if not c.name.startswith(".")):
            return "damaged"
        # A stopped build's finished folds or photos (`.resume-*`): run goes on where it stopped.
        if stage_dir.is_dir() and any(c.is_dir() and any(c.iterdir()) for c in stage_dir.glob(f".resume-*-{node.key}")):
            return "to resume"
        # Built before for other test images: run takes its train-image part (stage 2's photos arrived).
        if node.stage.earlier(self.ctx, node) is not None:
            return "to reuse"
        return "to build"

    def _track(self, node: Node, artifact: Artifact) -> None:
        from fishcomp.distributed import world
        from fishcomp.tracking import TRACKED_STAGES, track

        if node.stage.name in TRACKED_STAGES and world().is_main:
            track(self.ctx.tracking, self.ctx.work_dir, node.stage.name, node.name, node.loaded.config.model_dump(mode="json"), artifact)

    def _saved_references(self, node: Node, tmp: Path) -> dict[str, str]:
        """Where a saved config's references point: each at the config saved beside the artifact
        it built (relative, so the work folder can move), which names that artifact's own
        references the same way; so `fishcomp run -c <artifact>/config.yaml` rebuilds, or finds
        cached, exactly this artifact, whatever became of the config files it was run from. The
        referenced file itself (absolute) where no artifact was built for it (a member the data
        could not train) or the artifact's saved config predates this (names files, not artifacts).
        Collected over the upstream nodes of the same config (a submission's blend's members, a
        classifier's crops' box source), where each was resolved."""
        found: dict[str, str] = {}
        for field, target in node.stage.references(self, node).items():
            artifact = self._artifacts.get(target.key) if isinstance(target, Node) else None
            if artifact is not None and _saved_config_self_contained(artifact):
                found[field] = os.path.relpath(artifact.path / "config.yaml", tmp)
            else:
                found[field] = str((target.loaded.path if isinstance(target, Node) else target).resolve())
        for upstream in node.upstream():
            if upstream.loaded.path.resolve() == node.loaded.path.resolve() and upstream.loaded.config == node.loaded.config:
                found = {**self._saved_references(upstream, tmp), **found}
        return found

    def build(self, node: Node) -> Artifact:
        """The node's artifact: cached, or built after its inputs (each once per run)."""
        if node.key in self._artifacts:
            return self._artifacts[node.key]
        inputs: dict[str, Any] = {}
        for name, value in node.inputs.items():
            inputs[name] = [self.build(n) for n in value] if isinstance(value, list) else self.build(value)
        from fishcomp.distributed import ensure_together, world

        stage = node.stage

        def build(tmp: Path) -> dict:
            from fishcomp.context import describe_machine

            facts = stage.build(self.ctx, node, inputs, tmp) or {}
            if stage.saves_config and world().is_main:
                write_run_config(node.loaded.config, tmp, self._saved_references(node, tmp))
                facts[SELF_CONTAINED] = True
            # Seconds, and the last digits of a score, depend on the machine that built the
            # artifact; the scores on the data (a relabelled image, a cleaned copy), which no
            # setting names: `fishcomp runs` shows both where a work folder holds runs that differ.
            data = {"folder": str(self.ctx.data_dir.resolve()), "images": self.ctx.dataset().fingerprint()}
            fitted = {FIT_KEY: node.fit_key} if node.fit_key else {}
            return {**facts, **fitted, "machine": describe_machine(), "data": data}

        if stage.together:
            artifact = ensure_together(self.ctx.cache, stage.name, node.label, node.key, build)
        else:
            artifact = self.ctx.cache.ensure(stage.name, node.label, node.key, build)
        stage_line(stage.name, artifact.built, artifact.path, stage.describe(artifact))
        stage.after(self.ctx, node, artifact)
        if artifact.built and self.ctx.tracking is not None:
            self._track(node, artifact)
        self._artifacts[node.key] = artifact
        return artifact
