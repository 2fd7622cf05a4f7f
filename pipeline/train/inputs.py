"""Input and output checks a training stage runs before any process group or training step.

Each turns a failure that would otherwise surface late as a raw traceback (a truncated
safetensors file while the model loads, an IndexError on a split with 0 rows, a PermissionError
when the finished model is saved after all the training) into one error naming the path.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_BIN_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_weights(model_dir: str | Path, what: str) -> None:
    """`model_dir` has readable weights: every safetensors shard's header and size agree with
    its index (`CheckpointReader`), or a PyTorch .bin checkpoint is there."""
    from ..checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointReader

    model_dir = Path(model_dir)
    if (model_dir / SINGLE_FILE).is_file() or (model_dir / INDEX_FILE).is_file():
        try:
            CheckpointReader(model_dir).close()
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{what}: {exc}") from None
        return
    if not any((model_dir / name).is_file() for name in _BIN_WEIGHTS):
        raise FileNotFoundError(f"{what}: {model_dir} has no model weights ({SINGLE_FILE}, "
                                f"{INDEX_FILE} or {_BIN_WEIGHTS[0]})")


def count_saved_rows(split_dir: str | Path) -> int:
    """Rows of a dataset `save_to_disk` wrote (memory-mapped, nothing tokenized); 0 rows is an
    error (`load_saved_split`)."""
    from ..data.loading import load_saved_split

    return len(load_saved_split(split_dir))


def check_rows(num_rows: int, rows_per_step: int, where: str) -> None:
    """At least one optimizer step's worth of training rows."""
    if num_rows == 0:
        raise ValueError(f"{where}: the training split has 0 rows")
    if num_rows < rows_per_step:
        raise ValueError(f"{where}: {num_rows} rows, fewer than one optimizer step needs "
                         f"({rows_per_step} = micro_batch_size x grad_accum_steps x world_size)")


def check_writable(path: str | Path, what: str) -> None:
    """`path` (a dir to be created or replaced) can be written: a probe file is created and
    removed in its nearest existing ancestor (nothing else is created). Root ignores permission
    bits, so asking the file system is the one check that holds for every user and for
    read-only mounts."""
    path = Path(path).absolute()
    anchor = path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        if not anchor.is_dir():
            raise NotADirectoryError(20, f"{anchor} is not a directory")
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{what} {path} cannot be written: {anchor}: "
                              f"{exc.strerror or exc}; choose a writable location") from None
