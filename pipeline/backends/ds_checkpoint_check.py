"""Which DeepSpeed checkpoint a run resumes from, checked before any engine exists.

DeepSpeed itself reports a damaged checkpoint late and badly: a truncated `*model_states.pt`
is a raw unpickling traceback, a `latest` that names a missing tag a bare AssertionError, and a
checkpoint saved by another number of processes a ZeRORuntimeException after the model is
built. `resume_tag` looks at the files instead (no deepspeed import, no tensor loaded):

- a tag is intact when its dir holds model and optimizer state files, one optimizer file per
  data-parallel rank 0..N-1 (and, where present, one per-rank model/RNG file per rank), each
  non-empty and a readable torch zip archive (a truncated one has no zip end record);
- `latest` is tried first, then the older tags newest first: a damaged or missing newest tag
  falls back to the newest intact one, with a warning naming what was skipped and why (a dir
  newer than `latest` is an unfinished save and never used);
- the chosen tag's rank count must equal this run's world size (no resharding), else a
  ValueError naming both sizes.
"""
from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Optional

LATEST = "latest"
# DeepSpeed: [bf16_]zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt (every ZeRO stage),
# zero_pp_rank_{dp}_mp_rank_{mp}_model_states.pt (ZeRO-3), mp_rank_{mp}_model_states.pt;
# ours: rank_state_{rank:05d}.pt (RNG, pipeline.train.loop)
_RANK_FILES = {"optim": re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$"),
               "model": re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$"),
               "rank_state": re.compile(r"^rank_state_(\d+)\.pt$")}
log = logging.getLogger("h3fusion.checkpoints")


def _file_problem(path: Path) -> Optional[str]:
    if path.stat().st_size == 0:
        return f"{path.name} is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return f"{path.name} is an empty archive"
    except (zipfile.BadZipFile, OSError) as exc:
        return f"{path.name} is truncated or not a torch checkpoint ({exc})"
    return None


def _ranks(tag_dir: Path, kind: str) -> set[int]:
    pattern = _RANK_FILES[kind]
    return {int(m.group(1)) for p in tag_dir.iterdir() if (m := pattern.search(p.name))}


def checkpoint_problem(tag_dir: Path) -> Optional[str]:
    """Why the checkpoint in `tag_dir` cannot be resumed, or None when it looks intact."""
    if not tag_dir.is_dir():
        return f"{tag_dir.name}: no such checkpoint directory"
    if not list(tag_dir.glob("*model_states.pt")):
        return f"{tag_dir.name}: no *model_states.pt file"
    optim = _ranks(tag_dir, "optim")
    if not optim or optim != set(range(len(optim))):
        return f"{tag_dir.name}: optimizer state files for ranks {sorted(optim)}, not 0..N-1"
    for kind in ("model", "rank_state"):
        found = _ranks(tag_dir, kind)
        if found and found != optim:
            return f"{tag_dir.name}: {kind} files for ranks {sorted(found)} but optimizer " \
                   f"files for ranks {sorted(optim)} (an interrupted save?)"
    for path in sorted(tag_dir.glob("*.pt")):
        problem = _file_problem(path)
        if problem is not None:
            return f"{tag_dir.name}: {problem}"
    return None


def saved_world_size(tag_dir: Path) -> int:
    """How many data-parallel processes saved this (intact) checkpoint."""
    return len(_ranks(tag_dir, "optim"))


def _candidate_tags(save_dir: Path) -> list[str]:
    """`latest`'s tag first, then the older checkpoint dirs, newest first. Tags are
    `step{N:07d}` (pipeline.train.loop), so name order is step order. A dir newer than `latest`
    is a save that never finished (`latest` is written last), and without `latest` there is no
    finished checkpoint at all: neither is a candidate."""
    if not (save_dir / LATEST).is_file():
        return []
    named = (save_dir / LATEST).read_text().strip()
    older = sorted((p.name for p in save_dir.iterdir()
                    if p.is_dir() and p.name < named and list(p.glob("*model_states.pt"))),
                   reverse=True)
    return [named] + older


def resume_tag(save_dir: str | Path, world_size: int, announce: bool = True) -> Optional[str]:
    """The tag to resume from (None: no checkpoint at all). `announce`: log a fallback (rank 0).

    Raises ValueError when checkpoints exist but none is intact, or when the chosen one was
    saved by a different number of processes."""
    save_dir = Path(save_dir)
    candidates = _candidate_tags(save_dir)
    if not candidates:
        return None
    skipped = []
    for tag in candidates:
        problem = checkpoint_problem(save_dir / tag)
        if problem is None:
            break
        skipped.append(problem)
    else:
        raise ValueError(f"{save_dir}: no intact checkpoint to resume from ({'; '.join(skipped)}); "
                         f"delete {save_dir} to start over")
    if skipped and announce:
        log.warning("%s: skipping damaged checkpoint(s) (%s); resuming from the newest intact "
                    "one, %s", save_dir, "; ".join(skipped), tag)
    saved = saved_world_size(save_dir / tag)
    if saved != world_size:
        raise ValueError(f"{save_dir}/{tag}: checkpoint was saved by {saved} processes but this "
                         f"run has {world_size}; resume with {saved} processes (ZeRO checkpoints "
                         f"are not resharded), or delete {save_dir} to start over")
    return tag
