"""Loaders for the real datasets: local files (JSON / JSON lines / CSV) or a hub name.

A spec is a local path, or `hf:NAME[:CONFIG][@SPLIT]` (e.g. `hf:PKU-Alignment/BeaverTails@30k_train`,
`hf:truthful_qa:generation@validation`) read with `datasets.load_dataset`, or `hf:ORG/NAME/FILE`,
one file of a dataset repo fetched into the hub cache and read like a local file (pipeline.checkpoint.hub;
docs/hub.md) -- explicit, so a typo in a path never turns into a network call. Each loader
returns normalised records and names the file and row of any problem (`ValueError`), or the
missing file (`FileNotFoundError`; offline and not cached: `hub.HubUnavailableError`).
"""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from typing import Any, Callable

from ..checkpoint.hub import HUB_PREFIX, fetch_dataset_file, load_hub_dataset, parse_dataset_spec

TQA_SEP = "; "                              # TruthfulQA CSV: answers separated by "; "


def describe(spec: str) -> str:
    return spec if spec.startswith(HUB_PREFIX) else str(Path(spec))


def local_copy(spec: str) -> str:
    """A hub file spec (`hf:ORG/NAME/FILE`) -> its cached local path; any other spec unchanged."""
    if spec.startswith(HUB_PREFIX) and parse_dataset_spec(spec).file is not None:
        return str(fetch_dataset_file(spec))
    return spec


def _missing_file(path: Path) -> FileNotFoundError:
    hint = ""
    if not path.is_absolute() and str(path).count("/") == 1 and not path.suffix:
        hint = f" (a Hugging Face Hub dataset is written hf:{path})"
    return FileNotFoundError(f"dataset file not found: {path}{hint}")


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON lines ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: unknown dataset format: expected a JSON list of records, "
                         f"got {type(data).__name__}")
    return data


def _read_csv(path: Path) -> list[dict]:
    """CSV rows as records. The parser runs strict, and a row whose field count differs from the
    header's is an error naming its line: a lenient read turns an unterminated quote into one
    giant field and reports a "missing field" that the header does have. Lines starting with
    "#" before the header are comments."""
    with open(path, newline="", encoding="utf-8") as f:
        start = 1
        while f.read(1) == "#":        # leading "# dataset_version=..." lines (pyrit's CSVs)
            f.readline()
            start += 1
        f.seek(0)
        skipped = start - 1
        for _ in range(skipped):
            f.readline()
        reader = csv.reader(f, strict=True)
        header, records = None, []
        try:
            for row in reader:
                if header is None:
                    header = row
                elif row:
                    if len(row) != len(header):
                        raise ValueError(f"{path}: line {start}: {len(row)} fields, the header "
                                         f"has {len(header)} ({header}); quote fields that "
                                         f"contain commas")
                    records.append(dict(zip(header, row)))
                start = skipped + reader.line_num + 1
        except csv.Error as exc:
            raise ValueError(f"{path}: line {start}: CSV parse error ({exc}); a quoted field "
                             f"that starts on this line may never be closed") from None
    return records


def read_records(spec: str) -> list[dict]:
    """Raw records of a local file or hub spec; every record must be a mapping."""
    spec = local_copy(spec)
    if spec.startswith(HUB_PREFIX):
        records = load_hub_dataset(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise _missing_file(path)
        if path.suffix in (".json", ".jsonl"):
            records = _read_json(path)
        elif path.suffix == ".csv":
            records = _read_csv(path)
        else:
            raise ValueError(f"{path}: unknown dataset format {path.suffix!r} (expected .json, .jsonl or .csv)")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{describe(spec)}: row {i}: expected a record (mapping), got {type(rec).__name__}")
    if not records:
        raise ValueError(f"{describe(spec)}: no records")
    return records


def _field(rec: dict, name: str, spec: str, i: int, allow_empty: bool = False) -> Any:
    if name not in rec or rec[name] is None:
        raise ValueError(f"{describe(spec)}: row {i}: missing field {name!r} (fields: {sorted(rec)})")
    value = rec[name]
    if isinstance(value, str) and not allow_empty and not value.strip():
        raise ValueError(f"{describe(spec)}: row {i}: field {name!r} is empty")
    return value


def _require_columns(records: list[dict], spec: str, what: str, layouts: dict[str, tuple]) -> str:
    """Pick the first layout whose columns the FIRST record has; else one 'unknown format' error."""
    cols = set(records[0])
    for layout, needed in layouts.items():
        if set(needed) <= cols:
            return layout
    wanted = "; ".join(f"{k}: {list(v)}" for k, v in layouts.items())
    raise ValueError(f"{describe(spec)}: unknown {what} format: columns {sorted(cols)}; expected one of {wanted}")


# ----------------------------------------------------------------------------- datasets

def load_alpaca(spec: str) -> list[dict]:
    """Alpaca-style JSON: instruction, input (optional, "" if absent), output -> response."""
    records = read_records(spec)
    _require_columns(records, spec, "Alpaca", {"alpaca": ("instruction", "output")})
    return [{"instruction": _field(r, "instruction", spec, i).strip(), "input": str(r.get("input") or "").strip(),
             "response": _field(r, "output", spec, i).strip()} for i, r in enumerate(records)]


def load_alpaca_eval(spec: str) -> list[dict]:
    """AlpacaEval: instruction, output (the reference answer; may be "" -- one real row is), generator."""
    records = read_records(spec)
    _require_columns(records, spec, "AlpacaEval", {"alpaca_eval": ("instruction", "output")})
    return [{"instruction": _field(r, "instruction", spec, i).strip(),
             "output": _field(r, "output", spec, i, allow_empty=True).strip(),
             "generator": str(r.get("generator") or ""), "dataset": str(r.get("dataset") or "")}
            for i, r in enumerate(records)]


def _categories(value: Any, spec: str, i: int) -> list[str]:
    """CSV slice: one category name; hub: a dict of 14 booleans (maybe serialised as text)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{describe(spec)}: row {i}: unreadable category dict {value[:80]!r}") from None
    if isinstance(value, dict):
        return sorted(k for k, v in value.items() if _as_bool(v, spec, i, "category"))
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    raise ValueError(f"{describe(spec)}: row {i}: category must be a name or a dict of booleans, got {value!r}")


def _as_bool(value: Any, spec: str, i: int, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"{describe(spec)}: row {i}: field {name!r} must be a boolean, got {value!r}")


def load_beavertails(spec: str) -> list[dict]:
    """prompt, response, categories (list), is_safe.

    Without an `is_safe` column a row is safe iff it flags no harm category; the shared CSV slice
    gives every row one category, so all its rows are unsafe (as its README says).
    """
    records = read_records(spec)
    _require_columns(records, spec, "BeaverTails", {"beavertails": ("prompt", "response", "category")})
    out = []
    for i, r in enumerate(records):
        cats = _categories(_field(r, "category", spec, i, allow_empty=True), spec, i)
        has_flag = "is_safe" in r and r["is_safe"] not in (None, "")
        is_safe = _as_bool(r["is_safe"], spec, i, "is_safe") if has_flag else not cats
        out.append({"prompt": _field(r, "prompt", spec, i).strip(), "response": _field(r, "response", spec, i).strip(),
                    "categories": cats, "is_safe": is_safe, "is_safe_given": has_flag})
    return out


def _answers(value: Any, spec: str, i: int, name: str) -> list[str]:
    items = value.split(TQA_SEP) if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"{describe(spec)}: row {i}: field {name!r} must be a list or '; '-separated text")
    return [a.strip() for a in items if isinstance(a, str) and a.strip()]


TQA_LAYOUTS = {"csv": ("Question", "Best Answer", "Correct Answers", "Incorrect Answers"),
               "hf_generation": ("question", "best_answer", "correct_answers", "incorrect_answers")}


def load_truthfulqa(spec: str) -> list[dict]:
    """question, best_answer, correct (best first), incorrect, category -- from either layout."""
    records = read_records(spec)
    layout = _require_columns(records, spec, "TruthfulQA", TQA_LAYOUTS)
    q_col, best_col, ok_col, bad_col = TQA_LAYOUTS[layout]
    cat_col = "Category" if layout == "csv" else "category"
    out = []
    for i, r in enumerate(records):
        best = _field(r, best_col, spec, i).strip()
        correct = _answers(_field(r, ok_col, spec, i), spec, i, ok_col)
        incorrect = _answers(_field(r, bad_col, spec, i), spec, i, bad_col)
        if not incorrect:
            raise ValueError(f"{describe(spec)}: row {i}: field {bad_col!r} has no answers")
        out.append({"question": _field(r, q_col, spec, i).strip(), "best_answer": best,
                    "correct": [best] + [a for a in correct if a != best], "incorrect": incorrect,
                    "category": str(r.get(cat_col) or "")})
    return out


def _mc_targets(value: Any, spec: str, i: int, name: str) -> tuple[list[str], list[str]]:
    """mc_task.json: {answer: 0/1}; hub multiple_choice: {choices: [...], labels: [...]}."""
    if isinstance(value, dict) and "choices" in value and "labels" in value:
        pairs = list(zip(value["choices"], value["labels"]))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(f"{describe(spec)}: row {i}: {name!r} must be a mapping, got {type(value).__name__}")
    true = [str(a).strip() for a, y in pairs if int(y) == 1]
    false = [str(a).strip() for a, y in pairs if int(y) == 0]
    if not true or not false:
        raise ValueError(f"{describe(spec)}: row {i}: {name!r} needs at least one true and one false answer")
    return true, false


def load_truthfulqa_mc(spec: str) -> dict[str, dict]:
    """question -> {mc1_correct, mc1_incorrect, mc2_true, mc2_false}."""
    records = read_records(spec)
    _require_columns(records, spec, "TruthfulQA MC", {"mc": ("question", "mc1_targets", "mc2_targets")})
    out = {}
    for i, r in enumerate(records):
        mc1_true, mc1_false = _mc_targets(_field(r, "mc1_targets", spec, i), spec, i, "mc1_targets")
        if len(mc1_true) != 1:
            raise ValueError(f"{describe(spec)}: row {i}: mc1_targets must have exactly one correct answer")
        mc2_true, mc2_false = _mc_targets(_field(r, "mc2_targets", spec, i), spec, i, "mc2_targets")
        out[_field(r, "question", spec, i).strip()] = {"mc1_correct": mc1_true[0], "mc1_incorrect": mc1_false,
                                                      "mc2_true": mc2_true, "mc2_false": mc2_false}
    return out


LOADERS: dict[str, Callable[[str], Any]] = {
    "alpaca": load_alpaca, "alpaca_eval": load_alpaca_eval, "beavertails": load_beavertails,
    "truthfulqa": load_truthfulqa, "truthfulqa_mc": load_truthfulqa_mc}
