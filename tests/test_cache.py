import json

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
