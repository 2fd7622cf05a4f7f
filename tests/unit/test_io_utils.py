import os

import pytest

from pipeline.io_utils import OutputExistsError, atomic_dir, sha256_dir, sha256_file


def test_atomic_dir_renames_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_leaves_nothing_on_crash(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"123")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_hashes(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_dir(tmp_path) == {"f": sha256_file(tmp_path / "f")}


def _dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid   # reaped: no process has this pid now (pid reuse within the test: unlikely)


def test_atomic_dir_removes_leftovers_of_dead_processes_only(tmp_path):
    import socket
    out, dead, host = tmp_path / "model", _dead_pid(), socket.gethostname()
    stale = [tmp_path / f".model.tmp-{dead}", tmp_path / f".model.old-{dead}@{host}"]
    kept = [tmp_path / f".model.tmp-{os.getpid()}@{host}.x",   # not a leftover name
            tmp_path / f".model.tmp-{os.getppid()}",           # a live process (the parent)
            tmp_path / f".model.old-{dead}@other-host",        # another host's pid: unknown here
            tmp_path / f".other.tmp-{dead}"]                    # another output's leftover
    for d in stale + kept:
        d.mkdir()
        (d / "f").write_text("x")
    with atomic_dir(out) as tmp:
        assert tmp.name == f".model.tmp-{os.getpid()}@{host}"
        (tmp / "a").write_text("a")
    assert not any(d.exists() for d in stale)
    assert all(d.is_dir() for d in kept)
    assert (out / "a").read_text() == "a"


@pytest.mark.parametrize("kind", ["file", "dangling_link", "link_to_file"])
def test_atomic_dir_overwrite_never_replaces_a_non_directory(tmp_path, kind):
    out = tmp_path / "model"
    target = tmp_path / "target.txt"
    if kind == "file":
        out.write_text("precious")
    elif kind == "dangling_link":
        out.symlink_to(tmp_path / "missing")
    else:
        target.write_text("precious")
        out.symlink_to(target)
    with pytest.raises(OutputExistsError, match="not a directory.*--overwrite replaces only directories"):
        with atomic_dir(out, overwrite=True):
            raise AssertionError("must not start")
    assert os.path.lexists(out) and not out.is_dir()
    if kind == "file":
        assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model"] + (["target.txt"] if kind == "link_to_file" else []))
