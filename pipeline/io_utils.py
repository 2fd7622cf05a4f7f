"""Atomic output directories, hashing and manifests.

A stage writes into `.<out>.tmp-<pid>@<host>` and renames it onto `<out>` only when complete, so
a crash never leaves a directory that looks finished (the next `atomic_dir` for the same `<out>`
removes what a dead process left). A `*.json` manifest inside marks completeness.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator


class OutputExistsError(FileExistsError):
    pass


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> dict[str, str]:
    """sha256 of every regular file under `path`, keyed by relative path."""
    root = Path(path)
    return {str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def clean_stale_leftovers(out: str | Path) -> list[Path]:
    """Remove `.<out>.tmp-<pid>[@host]` / `.<out>.old-<pid>[@host]` directories whose process
    (on this host; no host: an older name, taken as this host) is gone; returns what was removed.
    A live writer's temp dir is kept, and so is one from another host (its pid means nothing
    here, e.g. on a shared file system)."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)(?:@(.+))?")
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*") if out.parent.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match is None or match[2] not in (None, socket.gethostname()):
            continue
        if not pid_alive(int(match[1])) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """An output directory may be written: absent, or a directory and `overwrite`. Stages call
    this before training too, so a wrong --out fails before any work."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():   # a file, or a link to nothing/a file
        raise OutputExistsError(f"output path exists and is not a directory: {out}; "
                                f"--overwrite replaces only directories: move or delete it")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory already exists: {out} (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success fsync and rename it to `out`.

    On any exception the temp dir is removed and `out` is left untouched. `overwrite` replaces
    an existing directory, never a file (or a link to one): that is always an error.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{_owner()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{_owner()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def read_json_object(path: str | Path, expected: str = "top level must be a JSON object") -> dict:
    """`read_json` of a file that must hold a JSON object; else one ValueError: `path: expected`."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {expected}")
    return data


MANIFEST = "manifest.json"


def is_complete(out: str | Path, manifest: str = MANIFEST) -> bool:
    """A stage output is complete when its directory holds its manifest (written last)."""
    return (Path(out) / manifest).is_file()
