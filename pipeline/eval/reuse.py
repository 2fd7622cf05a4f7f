"""`eval.reuse_from`: a model's results taken from an earlier evaluation when nothing that decides
them changed.

Where from (`EarlierResults`): `eval.reuse_from` is one entry or a list, searched in order:
"siblings" (the default) = the report at the same place in every other run dir beside this one
(`sibling_report_dirs`: `<run>/../*/eval` for `<run>/eval`), used only when that report was
written by the same code (`code_fingerprint`: the pipeline's sources, torch and transformers,
because a scoring fix changes results without changing any model's key); a path = that report
dir, whatever code wrote it (the user vouches for it); "" or "none" = evaluate every model.

Runs that share models evaluate them again: seeds that vary only fusion share the base, the
experts, the merges and the probability-average ensemble, which are 8 of a SmolLM2 run's 11
models and about 45 of its 67 evaluation minutes. A model's per-item metrics and generations are
a function of its weights and config, its tokenizer, the eval items and the per-model eval
settings, so a model whose `result_key` equals one recorded in the earlier report takes that
report's metrics and generation files. The key is over file *contents* (SHA-256), not paths or
times, so a copy of a model in another run dir matches and a retrained one never does.

Left out of the key: provenance files that loading a model never reads (`*manifest.json`,
`resolved_config.yaml`: they hold paths and times), and the settings used only after every
model ran (bootstrap draws, refusal labels, score overrides) -- plus `seed` when generation is
greedy, since it then decides nothing per model. Put in: with generation on, the outcome
judge's fingerprint (judges.judge_fingerprint), so results judged by another rule are not reused;
and a prompt format other than Alpaca (with_prompt_format: `base_chat` is the base's dir).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from .files import load_eval_items, save_generations
from .models import has_tokenizer

PROVENANCE_SUFFIXES = ("manifest.json", "resolved_config.yaml")
# settings read only after every model ran, or only by the judges (which need the generations)
REPORT_LEVEL_SETTINGS = ("n_boot", "refusal_labels", "judge_labels", "score_metrics", "reuse_from",
                         "generate_all")
SIBLINGS, OFF = "siblings", ("", "none")   # eval.reuse_from's keywords (module docstring)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_digest(path: Path, skip_provenance: bool) -> dict[str, str]:
    path = Path(path).resolve()
    return {str(f.relative_to(path)): _file_sha256(f) for f in sorted(path.rglob("*"))
            if f.is_file() and not (skip_provenance and f.name.endswith(PROVENANCE_SUFFIXES))}


def content_digest(model_dir: Path) -> dict[str, Any]:
    """Relative name -> SHA-256 of every file a load reads, with an ensemble's member dirs (its
    config names them, relative to it or absolute) digested the same way under "members"."""
    model_dir = Path(model_dir).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    members = [content_digest(model_dir / m) for m in config.get("members") or []]
    return {"files": _files_digest(model_dir, skip_provenance=True), "members": members}


def per_model_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The eval settings that decide a model's own metrics and generations."""
    kept = {k: v for k, v in settings.items() if k not in REPORT_LEVEL_SETTINGS}
    if not kept.get("do_sample"):
        kept.pop("seed", None)   # greedy generation: the seed decides nothing per model
    if kept.get("generate", True):   # the judged outcomes of the generations: the judge's rules
        from .judges import judge_fingerprint
        kept["outcome_judge"] = judge_fingerprint()
    return kept


def with_prompt_format(settings: dict[str, Any], prompt_format: str) -> dict[str, Any]:
    """`settings` plus the model's prompt format (pipeline.eval.prompts) when it is not the
    default Alpaca one: a model's results depend on it, and the keys of Alpaca-prompted models
    stay those that reports recorded before prompt formats existed."""
    from .prompts import ALPACA
    return dict(settings) if prompt_format == ALPACA else {**settings, "prompt_format": prompt_format}


def result_key(model_dir: Path, tokenizer_dir: Optional[Path], items: dict[str, list[dict]],
               settings: dict[str, Any]) -> Optional[str]:
    """SHA-256 over what decides one model's results (module docstring). The fallback tokenizer
    dir counts only when the model dir has no tokenizer of its own (loading uses the same rule);
    None when neither has one (the model cannot be loaded, so there is nothing to match)."""
    if has_tokenizer(model_dir):
        tokenizer = None
    elif tokenizer_dir is not None and has_tokenizer(tokenizer_dir):
        tokenizer = _files_digest(tokenizer_dir, skip_provenance=False)
    else:
        return None
    blob = {"model": content_digest(model_dir), "tokenizer": tokenizer, "items": items,
            "settings": per_model_settings(settings)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _last_change(model_dir: Path) -> float:
    """Latest change under a model dir: its files' mtimes and its dirs' mtime and ctime (a dir
    moved or renamed into place keeps its files' mtimes but gets a new ctime; a file added or
    renamed in changes the dir's mtime), an ensemble's members included."""
    model_dir = Path(model_dir).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    times = []
    for p in [model_dir, *model_dir.rglob("*")]:
        st = p.stat()
        times += [st.st_mtime, st.st_ctime] if p.is_dir() else [st.st_mtime]
    times += [_last_change(model_dir / m) for m in config.get("members") or []]
    return max(times)


def _unchanged_since(model_dir: Path, written: float) -> bool:
    """The model dir still holds what a report written at `written` evaluated: it exists and
    nothing in it changed after the report (a retrained, moved-in or replaced model did)."""
    return (Path(model_dir) / "config.json").is_file() and _last_change(model_dir) <= written


def _recorded_keys(report: dict[str, Any], where: Path) -> dict[str, Optional[str]]:
    """A report's `result_keys`; for a report written before they were recorded, computed from
    the model dirs and data dir it names -- only for dirs unchanged since the report was written
    (others get None: a path can hold another model by now)."""
    if "result_keys" in report:
        return report["result_keys"]
    cfg = report["config"]
    try:
        items = load_eval_items(Path(report["data_dir"]), cfg["split"], cfg["max_items_per_task"])
    except (FileNotFoundError, ValueError) as err:
        print(f"eval.reuse_from: {where} has no result_keys and its data dir cannot be read "
              f"({err}); nothing is reused", flush=True)
        return {}
    tokenizer = report.get("tokenizer_dir")
    written = (where / "report.json").stat().st_mtime
    return {name: result_key(Path(path), Path(tokenizer) if tokenizer else None, items, cfg)
            if _unchanged_since(Path(path), written) else None
            for name, path in report["models"].items()}


class PreviousResults:
    """The models of an earlier report dir, by name, with the result key each was evaluated
    under. A missing or unreadable report is an error naming `eval.reuse_from`, raised before
    any model loads. `keys`: given (a sibling's, from its manifest) or read from the report;
    the report itself (metrics, cost) is read when first needed."""

    def __init__(self, report_dir: str | Path, keys: Optional[dict[str, Optional[str]]] = None):
        self.dir = Path(report_dir)
        self._report: Optional[dict] = None
        if not (self.dir / "report.json").is_file():
            raise FileNotFoundError(f"eval.reuse_from: {self.dir / 'report.json'} does not exist "
                                    f"(give the report dir of an earlier `h3fusion evaluate`, e.g. "
                                    f"<run>/eval)")
        self.keys = _recorded_keys(self.report, self.dir) if keys is None else keys

    @property
    def report(self) -> dict[str, Any]:
        if self._report is None:
            path = self.dir / "report.json"
            try:
                self._report = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"eval.reuse_from: {path} is not valid JSON ({err})") from None
        return self._report

    @property
    def metrics(self) -> dict[str, dict]:
        return self.report["metrics"]

    @property
    def cost(self) -> dict[str, dict]:
        return self.report.get("cost") or {}   # absent in older reports

    def find(self, key: Optional[str]) -> Optional[str]:
        """The name of an earlier model evaluated under `key` (the key is over contents, so the
        name it had there does not matter), else None."""
        if key is None:
            return None
        return next((n for n, k in self.keys.items() if k == key and n in self.metrics), None)

    def copy_generations(self, earlier: str, name: str, dest_dir: Path) -> None:
        """The earlier report's saved generations of model `earlier` (JSON + CSV), if it saved
        any, as model `name`'s (the `generator` field renamed)."""
        src = self.dir / "generations" / f"{earlier}.json"
        if not src.is_file():
            return
        records = [{**r, "generator": name} for r in json.loads(src.read_text())]
        save_generations(Path(dest_dir), name, records)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of every Python source of the `pipeline` package (relative path and contents)
    and the torch and transformers versions: what else, besides a model's key, decides its
    results. Any edit counts (a comment too): a sibling is then evaluated again, never trusted."""
    import torch
    import transformers

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}"
                            .encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(f"\0{path.relative_to(root).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def sibling_report_dirs(out_dir: Path) -> list[Path]:
    """For a report dir `<run>/<name>` in a run dir (one with resolved_config.yaml, as `h3fusion
    run` writes): `<other>/<name>` of every other run dir `<other>` beside `<run>` that holds a
    finished report there, in name order. Nothing for a report dir outside a run dir."""
    out_dir = Path(out_dir).resolve()
    run = out_dir.parent
    if not (run / "resolved_config.yaml").is_file():
        return []
    return [other / out_dir.name for other in sorted(run.parent.iterdir())
            if other != run and (other / "resolved_config.yaml").is_file()
            and (other / out_dir.name / "report.json").is_file()]


def _sibling_keys(report_dir: Path, code: str) -> dict[str, Optional[str]]:
    """A sibling's result keys from its manifest.json, when the same code wrote it; else {}."""
    try:
        manifest = json.loads((report_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if manifest.get("code_fingerprint") != code:
        return {}
    return manifest.get("result_keys") or {}


def reuse_entries(setting: str | Sequence[str]) -> list[str]:
    """eval.reuse_from as a list of entries, the off keywords dropped."""
    entries = [setting] if isinstance(setting, str) else list(setting)
    return [str(e) for e in entries if str(e).strip().lower() not in OFF]


class EarlierResults:
    """Every report `eval.reuse_from` names (module docstring), searched in order for a model's
    key. An explicit report dir is read now (a missing one is an error before any model loads);
    a sibling is read only when its manifest's code fingerprint and one of its keys match."""

    def __init__(self, setting: str | Sequence[str], out_dir: Path):
        self.sources: list[PreviousResults] = []
        for entry in reuse_entries(setting):
            if entry != SIBLINGS:
                self.sources.append(PreviousResults(entry))
                continue
            found = sibling_report_dirs(out_dir)
            code = code_fingerprint() if found else ""
            same = [p for p in (PreviousResults(d, _sibling_keys(d, code)) for d in found) if p.keys]
            self.sources += same
            if found:
                print(f"eval.reuse_from: {len(found)} sibling report(s) beside "
                      f"{Path(out_dir).resolve().parent}, {len(same)} written by this code",
                      flush=True)

    def find(self, key: Optional[str]) -> Optional[tuple[PreviousResults, str]]:
        """(the report, the model's name there) of the first source holding `key`, else None."""
        for source in self.sources:
            try:
                earlier = source.find(key)
            except ValueError as err:   # only a sibling reads its report.json this late
                print(f"{err}: not used", flush=True)
                source.keys = {}
                continue
            if earlier is not None:
                return source, earlier
        return None
