import json
import os

import pytest

from fishcomp.cache import MANIFEST, Cache, write_atomic


def build_two_files(folder):
    (folder / "a.txt").write_text("alpha")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(b"\x00" * 100)
    return {"note": "built"}


def test_build_then_hit(tmp_path):
    cache = Cache(tmp_path)
    calls = []

    def build(folder):
        calls.append(folder)
        return build_two_files(folder)

    first = cache.ensure("stage", "label", "k1", build)
    second = cache.ensure("stage", "other-label", "k1", build)
    assert first.built and not second.built
    assert first.path == second.path == tmp_path / "stage" / "label-k1"
    assert len(calls) == 1
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["note"] == "built"
    assert manifest["files"]["sub/b.bin"]["bytes"] == 100
    assert not list((tmp_path / "stage").glob(".tmp-*"))


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    cache = Cache(tmp_path)

    def crash(folder):
        (folder / "half.npy").write_bytes(b"123")
        raise RuntimeError("boom at image 4000")

    with pytest.raises(RuntimeError):
        cache.ensure("stage", "label", "k2", crash)
    assert cache.find("stage", "k2") is None
    assert not [p for p in (tmp_path / "stage").glob("*k2*") if p.suffix != ".lock"]
    rebuilt = cache.ensure("stage", "label", "k2", build_two_files)
    assert rebuilt.built


def test_a_damaged_artifact_is_rebuilt(tmp_path):
    cache = Cache(tmp_path)
    artifact = cache.ensure("stage", "label", "k3", build_two_files)
    (artifact.path / "a.txt").write_text("alp")  # truncated after completion
    assert cache.find("stage", "k3") is None
    again = cache.ensure("stage", "label", "k3", build_two_files)
    assert again.built and (again.path / "a.txt").read_text() == "alpha"


def test_write_atomic_replaces_whole(tmp_path):
    target = tmp_path / "out" / "s.csv"
    write_atomic(target, "a,b\n")
    write_atomic(target, b"c,d\n")
    assert target.read_text() == "c,d\n"
    assert [p.name for p in target.parent.iterdir()] == ["s.csv"]


@pytest.mark.parametrize(
    "damage_it, reason",
    [
        (lambda path: (path / "sub" / "b.bin").unlink(), "sub/b.bin is missing"),
        (lambda path: (path / "a.txt").write_text("alp"), "a.txt has 3 bytes"),
        # Same size, other bytes: only the checksum can tell.
        (lambda path: (path / "sub" / "b.bin").write_bytes(b"\x01" * 100), "sub/b.bin does not match its checksum"),
    ],
)
def test_damage_after_completion_is_detected_reported_and_rebuilt(tmp_path, capsys, damage_it, reason):
    cache = Cache(tmp_path)
    artifact = cache.ensure("stage", "label", "k4", build_two_files)
    damage_it(artifact.path)
    # A later write always moves the modification time on a real machine, but two writes within
    # one tick of a coarse file-system clock may not: move it explicitly, as the write would.
    for file in artifact.path.rglob("*"):
        if file.is_file() and file.name != "manifest.json":
            os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 1_000_000_000))
    again = cache.ensure("stage", "label", "k4", build_two_files)
    assert again.built
    assert f"is damaged ({reason}" in capsys.readouterr().err
    assert cache.ensure("stage", "label", "k4", build_two_files).built is False


def test_an_untouched_artifact_is_not_rehashed(tmp_path, monkeypatch):
    from fishcomp import cache as cache_module

    cache = Cache(tmp_path)
    cache.ensure("stage", "label", "k5", build_two_files)
    hashed = []
    monkeypatch.setattr(cache_module, "file_digest", lambda path, *a: hashed.append(path) or "x")
    assert cache.find("stage", "k5") is not None and hashed == []


def _build_slowly(root, key, log):
    import time

    def build(folder):
        with open(log, "a") as handle:
            handle.write("start\n")
        time.sleep(1.0)
        (folder / "a.txt").write_text("alpha")
        with open(log, "a") as handle:
            handle.write("end\n")

    Cache(root).ensure("stage", "label", key, build)


def test_two_processes_building_the_same_artifact_never_interleave(tmp_path):
    import multiprocessing

    log = tmp_path / "log.txt"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_build_slowly, args=(tmp_path / "cache", "k6", log)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert log.read_text() == "start\nend\n"  # built once; the other waited and reused it
    assert (Cache(tmp_path / "cache").find("stage", "k6") / "a.txt").read_text() == "alpha"


def test_the_last_build_of_a_label_says_how_long_the_next_one_will_take(tmp_path):
    """`dag` and `run` estimate what is left from the newest artifact of the same stage and label
    (config): not an older one, not a label that only starts alike, not an unfinished build."""
    cache = Cache(tmp_path)
    assert cache.last_seconds("train", "dense") is None  # nothing built here yet
    for key in ("k1", "k2"):
        cache.ensure("train", "dense", key, build_two_files)
    cache.ensure("train", "dense_probe", "k3", build_two_files)
    stamps = {"k1": ("2026-01-02T10:00:00", 30.0), "k2": ("2026-01-02T11:00:00", 12.5)}
    for key, (created, seconds) in stamps.items():
        path = tmp_path / "train" / f"dense-{key}" / MANIFEST
        write_atomic(path, json.dumps({**json.loads(path.read_text()), "created": created, "seconds": seconds}))
    path = tmp_path / "train" / "dense_probe-k3" / MANIFEST
    write_atomic(path, json.dumps({**json.loads(path.read_text()), "created": "2026-01-03T00:00:00", "seconds": 99.0}))
    unfinished = tmp_path / "train" / ".tmp-dense-k4"
    unfinished.mkdir()
    (unfinished / MANIFEST).write_text('{"created": "2026-01-04T00:00:00", "seconds": 7')  # cut short
    assert cache.last_seconds("train", "dense") == 12.5
    assert cache.last_seconds("train", "dense_probe") == 99.0
    assert cache.last_seconds("precompute", "dense") is None


def test_the_donor_of_a_fit_key_is_the_newest_whole_artifact_built_for_other_test_images(tmp_path):
    """What a build for new test images takes its train part from (`Cache.donor`): an artifact of
    the same stage and fit key but another key, the newest first, never a damaged one, never the
    build's own key; none for another fit key or none at all."""
    from fishcomp.cache import FIT_KEY

    cache = Cache(tmp_path)
    for key, fit, created in (("k1", "f1", "2026-01-01T00:00:00"), ("k2", "f1", "2026-01-02T00:00:00"), ("k3", "f2", "2026-01-03T00:00:00")):
        artifact = cache.ensure("train", "run", key, lambda folder, fit=fit: {**build_two_files(folder), FIT_KEY: fit})
        manifest = json.loads((artifact.path / MANIFEST).read_text())
        write_atomic(artifact.path / MANIFEST, json.dumps({**manifest, "created": created}))
    fresh = Cache(tmp_path)  # each process reads the manifests once
    assert fresh.donor("train", "f1", "k9").key == "k2"
    assert fresh.donor("train", "f1", "k2").key == "k1"  # not itself
    assert fresh.donor("train", "f2", "k3") is None and fresh.donor("train", "f3", "k9") is None
    assert fresh.donor("train", None, "k9") is None and fresh.donor("crops", "f1", "k9") is None
    (tmp_path / "train" / "run-k2" / "a.txt").write_text("alpha, then touched")
    assert fresh.donor("train", "f1", "k9").key == "k1"  # the newer one is damaged
