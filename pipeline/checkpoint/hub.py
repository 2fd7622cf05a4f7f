"""Hugging Face Hub ids in a config, resolved through the local Hugging Face cache (docs/hub.md).

Models (`base.path`, `tokenizer.path`): `hf:ORG/NAME[@REVISION]` (a branch, tag or commit hash;
default `main`). A snapshot already in the cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub) is used as it is, without asking the Hub; otherwise its config,
tokenizer and safetensors files (never *.bin, *.pth, *.gguf) are fetched once into that cache
with `huggingface_hub.snapshot_download`. When the snapshot is not cached and the Hub cannot be
used (HF_HUB_OFFLINE=1, or the download fails to connect) that is ONE `HubUnavailableError`
naming the key, the id and how to pass a local directory instead.

Datasets (`data.real.*`): `hf:NAME[:CONFIG][@SPLIT]` is read with `datasets.load_dataset` (its
own cache); `hf:ORG/NAME/FILE` is one file of a dataset repo (e.g. the JSON that a loading-script
dataset ships, which `datasets` >= 4 cannot run), fetched into the hub cache like a model and
read as a local file. Parsing is pure (config validation uses it); the fetching imports
huggingface_hub / datasets only when called.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import env

HUB_PREFIX = "hf:"
# a snapshot's files the pipeline reads: config, generation config, tokenizer, safetensors weights
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt")
TOKENIZER_FILES = ("*.json", "tokenizer.model", "*.tiktoken", "merges.txt")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# what to pass instead of a hub id, per config key (the offline error says it)
LOCAL_HINTS = {
    "base.path": "set base.path to a local directory holding config.json and *.safetensors",
    "tokenizer.path": "set tokenizer.path to a local directory holding the tokenizer files "
                      "(tokenizer.json or tokenizer.model, with tokenizer_config.json)",
}
DATA_HINT = "point this data.real key at a local .json, .jsonl or .csv copy"
_NAME = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")


class HubUnavailableError(FileNotFoundError):
    """A hub id that cannot be had: not cached and the Hub not reachable (or offline), not on the
    Hub, gated, or its snapshot lacks files the pipeline needs. The command line reports it as a
    bad input (exit 2) before the stage writes anything."""


def is_hub_spec(value: object) -> bool:
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


# ----------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelRef:
    repo_id: str
    revision: Optional[str] = None      # None: the repo's main branch

    @property
    def spec(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Snapshot:
    """A resolved hub model: the cached snapshot dir and the commit it holds."""
    ref: ModelRef
    path: Path
    commit: str

    def provenance(self) -> dict:
        return {"id": self.ref.repo_id, "revision": self.ref.revision or "main",
                "commit": self.commit, "snapshot": str(self.path)}


def parse_model_spec(spec: str, key: str) -> ModelRef:
    """`hf:ORG/NAME[@REVISION]` -> ModelRef; anything else is one ValueError naming `key`."""
    repo_id, at, revision = spec[len(HUB_PREFIX):].partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not re.fullmatch(r"[^\s@]+", revision)):
        raise ValueError(f"{key}: {spec!r} is not a hub model id: write hf:ORG/NAME or "
                         f"hf:ORG/NAME@REVISION (a branch, tag or commit hash), or a local directory")
    return ModelRef(repo_id, revision or None)


def _cache_name() -> str:
    from huggingface_hub import constants
    return env.hf_hub_cache() or constants.HF_HUB_CACHE


def _offline_message(where: str, offline: bool, download: str, hint: str,
                     cached_problem: Optional[str] = None) -> str:
    """`where`: "KEY: SPEC" (or the spec alone, for data: the data stage names the key)."""
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
    state = (f": its cached copy is incomplete ({cached_problem})" if cached_problem else
             f" is not in the Hugging Face cache ({_cache_name()})")
    return (f"{where}{state} and {why}; {hint}, or fetch it once on a machine with network "
            f"(`{download}`, with HF_HOME or HF_HUB_CACHE naming the cache this run reads)")


def _fetch(fetch: Callable[[bool], str], spec: str, key: Optional[str], download: str,
           check: Callable[[Path], Optional[str]]) -> Path:
    """The cached copy when it passes `check` (no network), else a download (unless offline).
    `fetch(local_only)` -> local path; `check(path)` -> a problem or None; `key`: the config key
    the errors name (None: a data spec, whose key the data stage adds)."""
    from huggingface_hub import errors
    where = f"{key}: {spec}" if key else spec
    hint = LOCAL_HINTS.get(key or "", DATA_HINT)
    cached_problem = None
    try:
        path = Path(fetch(True))
        cached_problem = check(path)
        if cached_problem is None:
            return path
    except errors.LocalEntryNotFoundError as exc:     # not cached, or an incomplete snapshot
        if isinstance(exc, getattr(errors, "IncompleteSnapshotError", ())):
            cached_problem = "files listed for its commit are missing"
    if env.hf_hub_offline():
        raise HubUnavailableError(_offline_message(where, True, download, hint, cached_problem))
    try:
        path = Path(fetch(False))
    except errors.LocalEntryNotFoundError:     # the download could not connect
        raise HubUnavailableError(_offline_message(where, False, download, hint, cached_problem)) from None
    except errors.GatedRepoError:
        raise HubUnavailableError(f"{where} is gated on the Hub: accept its licence on its Hub page "
                                  f"and log in (`hf auth login`, or set HF_TOKEN); or {hint}") from None
    except errors.RepositoryNotFoundError:
        raise HubUnavailableError(f"{where}: no such repo on the Hub (or it is private: log in "
                                  f"with `hf auth login`, or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubUnavailableError(f"{where}: the Hub has no such revision of that repo") from None
    except errors.EntryNotFoundError:
        raise HubUnavailableError(f"{where}: the repo has no such file") from None
    problem = check(path)
    if problem is not None:
        raise HubUnavailableError(f"{where}: {problem}")
    return path


def _model_problem(path: Path, weights: bool) -> Optional[str]:
    """What a snapshot lacks for the pipeline (weights=False: a tokenizer only), or None."""
    if weights:
        if not (path / "config.json").is_file():
            return f"snapshot {path} has no config.json (not a Transformers model repo)"
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                return f"snapshot {path} lacks the weight shards {missing}"
        elif not any(path.glob("*.safetensors")):
            return (f"snapshot {path} has no *.safetensors weights (the pipeline reads "
                    f"safetensors only; convert the repo's weights and pass a local directory)")
    elif not any((path / m).is_file() for m in TOKENIZER_MARKERS):
        return f"snapshot {path} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)})"
    return None


def resolve_model(spec: str, key: str, weights: bool = True) -> Snapshot:
    """The cached snapshot of `spec` (fetched once when missing); `weights=False` needs only the
    tokenizer files (the tokenizer stage). Errors name `key` and the id."""
    ref = parse_model_spec(spec, key)
    from huggingface_hub import snapshot_download

    def fetch(local_only: bool) -> str:
        return snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=env.hf_hub_cache(),
                                 allow_patterns=list(MODEL_FILES if weights else TOKENIZER_FILES),
                                 local_files_only=local_only)

    download = f"hf download {ref.repo_id}" + (f" --revision {ref.revision}" if ref.revision else "")
    path = _fetch(fetch, spec, key, download, lambda p: _model_problem(p, weights))
    return Snapshot(ref, path, path.name)


def local_model_dir(value: str, key: str, weights: bool = True) -> tuple[Path, Optional[Snapshot]]:
    """`base.path` / `tokenizer.path` -> (local dir, the Snapshot when it was a hub id). A local
    path that does not exist but reads like a hub id gets the `hf:` hint."""
    if is_hub_spec(value):
        snap = resolve_model(value, key, weights)
        return snap.path, snap
    path = Path(value)
    if not path.exists() and _REPO_ID.fullmatch(value) and "/" in value:
        raise FileNotFoundError(f"{key}: {value} is not a local directory; to fetch it from the "
                                f"Hugging Face Hub write {key}: hf:{value}")
    return path, None


def config_hub_models(cfg, stages: Optional[set[str]] = None) -> list[tuple[str, str, bool]]:
    """(key, hub spec, needs weights) of the config's hub models, for the stages named (None:
    all): `tokenizer.path` is read by the tokenizer stage, `base.path` by the base stage."""
    wanted = [("tokenizer", "tokenizer.path", cfg.tokenizer.path, False),
              ("base", "base.path", cfg.base.path, True)]
    return [(key, value, weights) for stage, key, value, weights in wanted
            if is_hub_spec(value) and (stages is None or stage in stages)]


def resolve_config_models(cfg, stages: Optional[set[str]] = None, log=print) -> dict[str, Snapshot]:
    """Resolve (fetch once) every hub model the named stages read, before any of them runs."""
    out = {}
    for key, spec, weights in config_hub_models(cfg, stages):
        out[key] = resolve_model(spec, key, weights)
        log(f"{key}: {spec} -> {out[key].path}")
    return out


# ----------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class DatasetRef:
    name: str                     # dataset repo id (or the repo of `file`)
    config: Optional[str] = None
    split: str = "train"
    file: Optional[str] = None    # hf:ORG/NAME/FILE: this file of the dataset repo


def parse_dataset_spec(spec: str, key: str = "data.real") -> DatasetRef:
    """`hf:NAME[:CONFIG][@SPLIT]` or `hf:ORG/NAME/FILE` -> DatasetRef (ValueError naming `key`)."""
    body = spec[len(HUB_PREFIX):]
    if body.count("/") >= 2:
        org, name, file = body.split("/", 2)
        if not _REPO_ID.fullmatch(f"{org}/{name}") or not file or file.endswith("/"):
            raise ValueError(f"{key}: {spec!r} is not a hub file spec: write hf:ORG/NAME/FILE")
        return DatasetRef(f"{org}/{name}", file=file)
    rest, _, split = body.partition("@")
    name, _, config = rest.partition(":")
    if not _REPO_ID.fullmatch(name):
        raise ValueError(f"{key}: {spec!r} is not a hub dataset spec: write hf:NAME[:CONFIG][@SPLIT] "
                         f"(e.g. hf:PKU-Alignment/BeaverTails@30k_train) or hf:ORG/NAME/FILE")
    return DatasetRef(name, config or None, split or "train")


def fetch_dataset_file(spec: str) -> Path:
    """The cached copy of `hf:ORG/NAME/FILE` (fetched once into the hub cache when missing)."""
    ref = parse_dataset_spec(spec)
    if ref.file is None:
        raise ValueError(f"{spec!r} names a dataset, not a file (hf:ORG/NAME/FILE)")
    from huggingface_hub import hf_hub_download

    def fetch(local_only: bool) -> str:
        return hf_hub_download(ref.name, ref.file, repo_type="dataset", cache_dir=env.hf_hub_cache(),
                               local_files_only=local_only)

    download = f"hf download {ref.name} {ref.file} --repo-type dataset"
    return _fetch(fetch, spec, None, download, lambda p: None if p.is_file() else f"{p} is not a file")


def load_hub_dataset(spec: str) -> list[dict]:
    """Rows of `hf:NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset` (its own cache; it reads
    HF_HUB_OFFLINE / HF_DATASETS_CACHE itself). Offline and not cached: one HubUnavailableError."""
    ref = parse_dataset_spec(spec)
    from datasets import load_dataset
    how = (f"{DATA_HINT}, or load it once on a machine with network (with HF_HOME or "
           f"HF_DATASETS_CACHE naming the cache this run reads)")
    try:
        data = load_dataset(ref.name, ref.config, split=ref.split)
    except ConnectionError:            # offline (HF_HUB_OFFLINE) or the Hub unreachable
        raise HubUnavailableError(f"{spec} is not in the datasets cache and the Hub cannot be "
                                  f"reached (or HF_HUB_OFFLINE is set); {how}") from None
    except RuntimeError as exc:
        if "scripts are no longer supported" not in str(exc):
            raise
        raise ValueError(f"{spec} is a loading-script dataset, which this `datasets` cannot run; "
                         f"read one of its data files instead (hf:{ref.name}/FILE, e.g. "
                         f"hf:tatsu-lab/alpaca_eval/alpaca_eval.json), or {how}") from None
    return [dict(r) for r in data]
