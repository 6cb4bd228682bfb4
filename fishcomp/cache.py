"""Content-addressed artifact directories, built in a temporary folder and renamed into place.

An artifact is `<work>/<stage>/<label>-<key>/`; it is complete only when its `manifest.json`
exists, and the manifest is written last, inside the temporary folder, before the rename. So a
crash at any point leaves either nothing or a stray `.tmp-*` folder that the next build removes,
never a half-written artifact that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from fishcomp.config import flatten_config
from fishcomp.console import warn
from fishcomp.errors import FishcompError
from fishcomp.version import __version__

MANIFEST = "manifest.json"
# In the manifest: what the artifact's train-image part depends on (`graph.Stage.fit_params`).
FIT_KEY = "fit_key"


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    built: bool  # False when it came from the cache

    def file(self, name: str) -> Path:
        return self.path / name


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folders_named(folders: list[Path], ref: str) -> list[Path]:
    """The artifact folders (`label-key`) that `ref` names: a whole folder name, a key or its
    start, or a label and the start of its key (`crops-b88c`, as `fishcomp runs` shortens them)."""
    labelled = "-" in ref and len(ref.rsplit("-", 1)[1]) >= 4
    return [f for f in folders if f.name == ref or f.name.rsplit("-", 1)[1].startswith(ref) or (labelled and f.name.startswith(ref))]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file or nothing: a temporary sibling, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _manifest_entries(folder: Path) -> dict[str, dict]:
    entries = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        stat = file.stat()
        entries[rel] = {"bytes": stat.st_size, "sha256": file_digest(file), "mtime_ns": stat.st_mtime_ns}
    return entries


def damage(folder: Path) -> str | None:
    """Why a finished artifact cannot be trusted, or None when it is whole.

    Sizes are checked on every lookup (cheap). A file whose modification time differs from the
    manifest's was touched after the artifact was finished, so its SHA-256 is checked too: the
    common case costs a stat per file, and a same-size corruption is still caught.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest: never finished"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "unreadable manifest"
    for rel, entry in entries.items():
        file = folder / rel
        if not file.is_file():
            return f"{rel} is missing"
        stat = file.stat()
        if stat.st_size != entry["bytes"]:
            return f"{rel} has {stat.st_size} bytes, the manifest says {entry['bytes']}"
        if "mtime_ns" in entry and stat.st_mtime_ns != entry["mtime_ns"] and file_digest(file) != entry["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def resumed_seconds(seconds: float) -> dict:
    """A build's manifest fact for what stopped builds of the same artifact spent on it (kept folds,
    embedded photos): `Cache.ensure` counts it in the artifact's seconds. Empty when none."""
    return {"seconds_before_resume": round(seconds, 3)} if seconds else {}


def compared_settings(config: dict | None, manifest: dict) -> dict[str, str]:
    """What runs of one config are compared by (`fishcomp runs`' differs, `fishcomp diff`): the
    artifact's resolved config as flat text, and the data it was built from, which no setting
    names: its folder's name and the images' fingerprint (names, sizes, times), so that runs on a
    relabelled or cleaned copy of the data are told apart from runs that differ in nothing. Empty
    where the artifact kept no config (built before its stage did); no data where its manifest
    records none."""
    if not config:
        return {}
    # A reference saved as its artifact's config (`../../train/fcn-<key>/config.yaml`) is that
    # artifact: `train/fcn-<key>`, as `fishcomp runs` and `cache ls` name it.
    settings = {name: re.sub(r"^(?:\.\./)+([^/]+/[^/]+)/config\.yaml$", r"\1", value) for name, value in flatten_config(config).items()}
    data = manifest.get("data")
    if isinstance(data, dict) and data.get("images"):
        settings["data"] = f"{Path(str(data.get('folder', ''))).name}@{str(data['images'])[:8]}"
    return settings


def _timed_manifest(folder: Path) -> dict | None:
    """An artifact's manifest where it records its build seconds; None otherwise."""
    try:
        facts = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):  # absent, or being written or cut short: no evidence
        return None
    return facts if isinstance(facts.get("seconds"), (int, float)) else None


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)
        # Per stage: (created, folder, key, fit key) of each finished artifact, read once a process
        # (`dag` asks for every node): a work folder of sweeps holds hundreds of manifests.
        self._fits: dict[str, list[tuple[str, Path, str, str]]] = {}

    def folder(self, stage: str, label: str, key: str) -> Path:
        return self.root / stage / f"{label}-{key}"

    def temp_folder(self, stage: str, label: str, key: str) -> Path:
        """Where an artifact is built before it is published (known to every rank of a run)."""
        return self.root / stage / f".tmp-{label}-{key}"

    def _published(self, stage: str, key: str) -> list[Path]:
        """The folders published under this key, whatever label, complete or not."""
        stage_dir = self.root / stage
        return [c for c in stage_dir.glob(f"*-{key}") if not c.name.startswith(".")] if stage_dir.is_dir() else []

    def find(self, stage: str, key: str) -> Path | None:
        """The complete, undamaged artifact with this key, whatever label it was built under."""
        return next((c for c in self._published(stage, key) if damage(c) is None), None)

    def donor(self, stage: str, fit_key: str | None, key: str) -> Artifact | None:
        """The newest whole artifact of `stage` built for other test images from the same train
        images, settings and upstream fits (the same `fit_key`), whose train-image part a build of
        `key` can take instead of redoing it; None where there is none."""
        if fit_key is None:
            return None
        if stage not in self._fits:
            stage_dir = self.root / stage
            found = []
            for folder in stage_dir.iterdir() if stage_dir.is_dir() else ():
                facts = None if folder.name.startswith(".") else _timed_manifest(folder)
                if facts is not None and facts.get(FIT_KEY):
                    found.append((str(facts.get("created", "")), folder, str(facts.get("key", "")), facts[FIT_KEY]))
            self._fits[stage] = sorted(found, reverse=True)
        for _, folder, its_key, its_fit in self._fits[stage]:
            if its_fit == fit_key and its_key != key and folder.is_dir() and damage(folder) is None:
                return Artifact(stage, its_key, folder, built=False)
        return None

    def last_seconds(self, stage: str, label: str) -> float | None:
        """How long the newest complete artifact of this stage and label took to build: about what
        another of the same config will take (a sweep's next value, a changed setting). None where
        none was built in this work folder."""
        stage_dir = self.root / stage
        newest = None
        for folder in stage_dir.glob(f"{label}-*") if stage_dir.is_dir() else []:
            if folder.name.startswith(".") or folder.name.rsplit("-", 1)[0] != label:
                continue
            facts = _timed_manifest(folder)
            if facts is not None and (newest is None or str(facts.get("created")) > str(newest.get("created"))):
                newest = facts
        return None if newest is None else float(newest["seconds"])

    def seconds(self, stage: str, key: str) -> float | None:
        """How long the artifact with this key took to build (None: not here, or no record).
        Its manifest alone: a number to report needs no check of every file, as `find` makes."""
        timed = (_timed_manifest(c) for c in self._published(stage, key))
        facts = next((f for f in timed if f is not None), None)
        return None if facts is None else float(facts["seconds"])

    def _damaged(self, stage: str, key: str) -> list[tuple[Path, str]]:
        found = [(c, damage(c)) for c in self._published(stage, key)]
        return [(c, reason) for c, reason in found if reason is not None]

    def ensure(
        self,
        stage: str,
        label: str,
        key: str,
        build: Callable[[Path], dict | None],
        on_wait: Callable[[], None] | None = None,
    ) -> Artifact:
        """Return the cached artifact, or build it with `build(tmp_dir)` and publish it atomically.

        `build` may return a dict that is stored in the manifest (counts, timings, summary).
        """
        found = self.find(stage, key)
        if found is not None:
            return Artifact(stage, key, found, built=False)
        for folder, reason in self._damaged(stage, key):
            warn(f"{folder} is damaged ({reason}); rebuilding it")
        stage_dir = self.root / stage
        try:
            stage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FishcompError(f"cannot create the artifact folder {stage_dir}: {exc.strerror}") from exc
        lock = FileLock(str(stage_dir / f".{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait()
            else:
                warn(f"another fishcomp process is building {stage} {label}-{key}; waiting for it to finish")
            lock.acquire()  # another process builds the same artifact: wait, then use its result
        try:
            found = self.find(stage, key)
            if found is not None:
                return Artifact(stage, key, found, built=False)
            final = self.folder(stage, label, key)
            tmp = self.temp_folder(stage, label, key)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            started = time.time()
            try:
                extra = build(tmp) or {}
                # A build that went on from a stopped one (a resumed backbone pass) cost both.
                seconds = time.time() - started + float(extra.get("seconds_before_resume", 0.0))
                manifest = {
                    "stage": stage,
                    "key": key,
                    "fishcomp": __version__,
                    "seconds": round(seconds, 3),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    **extra,
                    "files": _manifest_entries(tmp),
                }
                write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
                if final.exists():  # an incomplete or damaged earlier copy
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._fits.pop(stage, None)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise FishcompError(f"writing {stage} artifact failed: {exc.strerror or exc} ({exc.filename or tmp})") from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return Artifact(stage, key, final, built=True)
        finally:
            lock.release()
