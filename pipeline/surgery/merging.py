"""Merging baselines of the paper: weight average, task arithmetic and TIES.

Pure tensor functions (`average`, `task_arithmetic`, `ties`) work on one parameter at a time in
fp32 and return the input dtype; `merge_checkpoints` streams them over whole HF Llama dirs one
tensor at a time; `h3fusion merge` merges a run's three experts into `<run>/merges/<method>`.

Each registered method (`pipeline.registry.MERGE_METHODS`) is one `MergeMethod` object: its
per-tensor maths, the settings it reads (`Setting`: type, range, default, the `merge.*` config
key of a run's value) and an optional whole-model pass. Config validation, `h3fusion merge`,
`h3fusion surgery merge` (one flag per setting name) and the manifests all read the entry, so
a new method is one `MergeMethod` + one registry line.

- average:          mean_i θ_i
- task_arithmetic:  θ_base + λ Σ_i (θ_i − θ_base)
- ties (Yadav et al. 2023): τ_i = θ_i − θ_base, keep the top `density` fraction of |τ_i|,
  elect a sign per entry as sgn(Σ_i τ̂_i) (the sign with more total magnitude), average only
  the kept entries that agree with it (disjoint mean), θ_base + λ · mean.

TIES trim scope (`merge.ties_trim_scope`, registry `pipeline.registry.TIES_TRIM_SCOPES`):
- `model` (the paper, and the TIES authors' `topk_values_mask` on the state dict flattened into
  one vector): one magnitude threshold per model over ALL its floating entries. The threshold is
  the ceil(density·n)-th largest |τ_i|; entries tied with it are all kept (the authors' `>=`).
  Their code's k = n − int(n·density) keeps one entry more than ceil; we keep the same count as
  the `tensor` scope. With FFN-only experts the frozen parameters' zero deltas count in n, as
  they do in the authors' flattened vector.
- `tensor` (mergekit's and our earlier form): the top fraction of each tensor separately.

Memory: at 7B one model's concatenated |τ| is 28 GB in fp32 (torch.kthvalue on it would need that
and more), so `model_trim_thresholds` finds the exact k-th value by a two-pass radix select over
the fp32 bit patterns (non-negative floats order like their int32 bits): a 65536-bin histogram
of the high 16 bits, then of the low 16 bits inside the bucket that holds the k-th value. Memory
is one tensor at a time plus the histograms; cost is two extra streaming reads of the inputs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from ..io_utils import atomic_dir, sha256_dir, write_json
from ..registry import MERGE_METHODS, TIES_TRIM_SCOPES, Registry
from . import plan
from ..checkpoint.safetensors_io import (DEFAULT_SHARD_BYTES, CheckpointReader, ShardedWriter,
                                     copy_optional_files, copy_tokenizer_files, read_config_json)

log = logging.getLogger(__name__)
METHODS = MERGE_METHODS.names()   # registered in pipeline.registry.MERGE_METHODS
MANIFEST = "merge_manifest.json"


def average(tensors: list[torch.Tensor]) -> torch.Tensor:
    # anchored at the first model so that entries equal in every model come back bit-exact
    # (a plain fp32 mean of three equal values can be off by one ulp)
    anchor = tensors[0].float()
    deltas = torch.stack([t.float() - anchor for t in tensors])
    return (anchor + deltas.mean(dim=0)).to(tensors[0].dtype)


def task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], scale: float) -> torch.Tensor:
    base32 = base.float()
    task_sum = torch.stack([t.float() - base32 for t in tensors]).sum(dim=0)
    return (base32 + scale * task_sum).to(base.dtype)


def trim_to_density(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density * n) largest-magnitude entries (ties keep the first found)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    flat = task_vector.reshape(-1)
    keep = math.ceil(density * flat.numel())
    if keep >= flat.numel():
        return task_vector.clone()
    idx = torch.topk(flat.abs(), keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(task_vector.shape)


def ties(base: torch.Tensor, tensors: list[torch.Tensor], density: float,
         scale: float = 1.0, thresholds: Optional[Sequence[float]] = None) -> torch.Tensor:
    """`thresholds`: per model, the whole-model magnitude threshold (`model` trim scope:
    keep |τ_i| >= thresholds[i]); None trims each tensor to `density` on its own."""
    base32 = base.float()
    if thresholds is None:
        trimmed = torch.stack([trim_to_density(t.float() - base32, density) for t in tensors])
    else:
        trimmed = torch.stack([trim_below(t.float() - base32, thr)
                               for t, thr in zip(tensors, thresholds, strict=True)])
    elected_sign = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected_sign) & (trimmed != 0)
    kept_sum = (trimmed * agrees).sum(dim=0)
    count = agrees.sum(dim=0).clamp_min(1)
    return (base32 + scale * kept_sum / count).to(base.dtype)


def trim_below(task_vector: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the entries with |τ| >= threshold (the `model` trim scope), zero the rest."""
    return torch.where(task_vector.abs() >= threshold, task_vector,
                       torch.zeros((), dtype=task_vector.dtype))


# ----------------------------------------------------------------------------- TIES trim scopes
# registered in pipeline.registry.TIES_TRIM_SCOPES: fn(keys, base_get, model_gets, density) ->
# one threshold per model, or None for per-tensor trimming
_HALF = 16
_BINS = 1 << _HALF


def _abs_bits(keys: Sequence[str], base_get: Callable, model_gets: Sequence[Callable]):
    """(model index, |τ| of one floating tensor as int32 bit patterns), tensor by tensor (fp32
    math, as in `ties`); each base tensor is read once per pass."""
    for key in keys:
        base32 = base_get(key)
        if not base32.is_floating_point():
            continue                       # integer buffers are not merged, so not counted
        base32 = base32.float()
        for i, get in enumerate(model_gets):
            yield i, (get(key).float() - base32).abs().reshape(-1).view(torch.int32)


def _last_bin_reaching(hist: torch.Tensor, above: int, keep: int) -> tuple[int, int]:
    """Highest bin b with above + #entries in bins >= b reaching `keep`; and #entries above b."""
    tail = hist.flip(0).cumsum(0).flip(0) + above
    b = int(torch.nonzero(tail >= keep).max())
    return b, int(tail[b] - hist[b])


def model_trim_thresholds(keys: Iterable[str], base_get: Callable, model_gets: Sequence[Callable],
                          density: float) -> list[float]:
    """Per model, the ceil(density·n)-th largest |τ| over all floating entries of all `keys`:
    an exact two-pass radix select over fp32 bit patterns (see the module docstring)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    keys = list(keys)
    high = [torch.zeros(_BINS, dtype=torch.int64) for _ in model_gets]
    count = [0] * len(model_gets)
    for i, bits in _abs_bits(keys, base_get, model_gets):
        high[i] += torch.bincount(bits >> _HALF, minlength=_BINS)
        count[i] += bits.numel()
    keep = [math.ceil(density * n) for n in count]
    picked = [_last_bin_reaching(h, 0, k) for h, k in zip(high, keep)]
    low = [torch.zeros(_BINS, dtype=torch.int64) for _ in model_gets]
    for i, bits in _abs_bits(keys, base_get, model_gets):
        in_bin = bits[(bits >> _HALF) == picked[i][0]]
        low[i] += torch.bincount(in_bin & (_BINS - 1), minlength=_BINS)
    thresholds = []
    for (hi, above), lo_hist, k in zip(picked, low, keep):
        lo, _ = _last_bin_reaching(lo_hist, above, k)
        bits = torch.tensor([(hi << _HALF) | lo], dtype=torch.int32)
        thresholds.append(float(bits.view(torch.float32)))
    return thresholds


def tensor_trim_thresholds(keys, base_get, model_gets, density) -> None:
    """The `tensor` scope needs no global pass: `ties` trims each tensor to `density`."""
    return None


# ----------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Setting:
    """One setting a merge method reads: its name (the `settings` key and the CLI flag
    `--<name>`), type, default, accepted range and the config key of a run's value."""
    name: str
    type: type                              # float, int or str
    default: Any
    help: str = ""
    ok: Optional[Callable[[Any], bool]] = None   # the range (numbers: after being finite)
    words: str = "a finite number"          # the range in words, for the error
    choices: Optional[Registry] = None      # the value is a name registered there
    config_key: Optional[str] = None        # `merge.<config_key>` holds a run's value
    absent: Any = None                      # assumed when an older manifest lacks the setting

    def value(self, raw: Any, key: str) -> Any:
        """`raw` checked (an int is a float where a float is wanted); ValueError naming `key`."""
        if self.type is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if type(raw) is not self.type:
            raise ValueError(f"key '{key}' must be {self.type.__name__}, got "
                             f"{type(raw).__name__} {raw!r}")
        if self.choices is not None:
            return self.choices.check(raw, key)
        if (self.type in (int, float) and not math.isfinite(raw)) or \
                (self.ok is not None and not self.ok(raw)):
            raise ValueError(f"key '{key}' must be {self.words}, got {raw!r}")
        return raw


@dataclass(frozen=True)
class MergeMethod:
    """A merging method: `merge(base, tensors, settings, context)` merges one floating tensor
    (fp32 maths, the input dtype back); `prepare(keys, base_get, model_gets, settings)`, if
    given, is a pass over the whole model first whose result (`context`, a dict) every tensor
    sees and the manifest records. `settings` are the keys it reads; calling the method merges
    one tensor (integer buffers come back as the base's)."""
    name: str
    merge: Callable[..., torch.Tensor]
    settings: tuple[Setting, ...] = ()
    prepare: Optional[Callable[..., dict]] = None

    def __call__(self, base: torch.Tensor, tensors: list[torch.Tensor], settings: dict,
                 context: Optional[dict] = None) -> torch.Tensor:
        if not tensors[0].is_floating_point():
            return base.clone()    # integer buffers are not merged
        return self.merge(base, tensors, settings, context or {})

    def check(self, settings: Mapping[str, Any], where: str,
              key: Optional[Callable[[Setting], str]] = None) -> dict:
        """Every setting of the method: the given value, else its default, each checked; one
        ValueError naming the key (`key(setting)`, default its name) or the unknown key."""
        names = [s.name for s in self.settings]
        prefix = f"{where}: " if where else ""
        for k in settings:
            if k not in names:
                raise ValueError(f"{prefix}unknown setting {k!r} of merge method {self.name!r} "
                                 f"(its settings: {', '.join(names) or 'none'})")
        out = {}
        for s in self.settings:
            try:
                out[s.name] = s.value(settings.get(s.name, s.default),
                                      key(s) if key else s.name)
            except ValueError as exc:
                raise ValueError(f"{prefix}{exc}") from None
        return out

    def config_settings(self, merge_cfg: Any) -> dict:
        """A run's settings (`MergeConfig`): each from its `merge.<config_key>`, the default
        where it has none; checked, errors naming the config key."""
        raw = {}
        for s in self.settings:
            if s.config_key is not None and not hasattr(merge_cfg, s.config_key):
                raise ValueError(f"merge method {self.name!r}: setting {s.name!r} reads "
                                 f"merge.{s.config_key}, which is no config key")
            raw[s.name] = getattr(merge_cfg, s.config_key) if s.config_key else s.default
        return self.check(raw, "", key=lambda s: f"merge.{s.config_key}" if s.config_key
                          else f"{self.name}.{s.name}")

    def context(self, keys: Sequence[str], base_get: Callable, model_gets: Sequence[Callable],
                settings: dict) -> dict:
        return self.prepare(keys, base_get, model_gets, settings) if self.prepare else {}


def _average(base, tensors, settings, context) -> torch.Tensor:
    return average(tensors)


def _task_arithmetic(base, tensors, settings, context) -> torch.Tensor:
    return task_arithmetic(base, tensors, settings["scale"])


def _ties_trim(keys, base_get, model_gets, settings) -> dict:
    """TIES's whole-model pass: the trim scope's per-model thresholds (None: per tensor)."""
    scope = TIES_TRIM_SCOPES.get(settings["trim_scope"], "TIES trim scope")
    return {"trim_thresholds": scope(keys, base_get, model_gets, settings["density"])}


def _ties(base, tensors, settings, context) -> torch.Tensor:
    return ties(base, tensors, settings["density"], settings["scale"],
                context.get("trim_thresholds"))


AVERAGE = MergeMethod("average", _average)
TASK_ARITHMETIC = MergeMethod("task_arithmetic", _task_arithmetic, settings=(
    Setting("scale", float, 0.5, "λ, the weight of the summed task vectors",
            config_key="task_arithmetic_scale"),))
TIES = MergeMethod("ties", _ties, prepare=_ties_trim, settings=(
    Setting("scale", float, 1.0, "λ, the weight of the disjoint mean", config_key="ties_scale"),
    Setting("density", float, 0.5, "fraction of each task vector kept",
            ok=lambda v: 0 < v <= 1, words="in (0, 1]", config_key="ties_density"),
    # a manifest from before the option trimmed per tensor
    Setting("trim_scope", str, "model", "trim over the whole model's task vector (model, the "
            "paper) or each tensor on its own (tensor, mergekit)", choices=TIES_TRIM_SCOPES,
            config_key="ties_trim_scope", absent="tensor"),
))


def merge_method(name: str, where: str = "merge method") -> MergeMethod:
    """The method registered as `name` (pipeline.registry.MERGE_METHODS)."""
    return MERGE_METHODS.get(name, where)


def setting_options() -> dict[str, tuple[type, Optional[Registry], str]]:
    """Every registered method's settings by name: (type, registry of allowed names or None,
    help naming each method that reads it and its default), for command-line flags."""
    out: dict[str, tuple[type, Optional[Registry], str]] = {}
    for name in MERGE_METHODS.names():
        for s in merge_method(name).settings:
            tp, choices, text = out.get(s.name, (s.type, s.choices, ""))
            if tp is not s.type:
                raise ValueError(f"merge setting {s.name!r}: {name} reads a {s.type.__name__}, "
                                 f"another method a {tp.__name__}")
            text += f"{'; ' if text else ''}{name}: {s.help} (default {s.default})"
            out[s.name] = (tp, choices, text)
    return out


def merge_tensor(method: str, base: torch.Tensor, tensors: list[torch.Tensor],
                 settings: Optional[Mapping[str, Any]] = None,
                 context: Optional[dict] = None) -> torch.Tensor:
    """One tensor merged by `method` with `settings` (defaults filled in); `context`: the
    method's whole-model pass, if any (None: none, so TIES trims this tensor on its own)."""
    merger = merge_method(method)
    return merger(base, tensors, merger.check(settings or {}, f"merge method {method!r}"), context)


def merge_state_dicts(method: str, base: dict, models: Sequence[dict], **settings) -> dict:
    """In-memory form of `merge_checkpoints` (same maths) for state dicts with equal keys."""
    merger = merge_method(method)
    settings = merger.check(settings, f"merge method {method!r}")
    context = merger.context(list(base), base.__getitem__, [m.__getitem__ for m in models],
                             settings)
    return {k: merger(v, [m[k] for m in models], settings, context) for k, v in base.items()}


def _open_all(base_dir: Path, models: dict[str, Path],
              tokenizer_dir: Path) -> tuple[dict, CheckpointReader, dict]:
    """Validate architecture, tokenizer and tensor names/shapes of every input."""
    from ..checkpoint.tokenizer_check import check_same_tokenizer, has_tokenizer
    base_cfg = read_config_json(base_dir)
    cfgs = {f"model {n!r} ({d})": read_config_json(d) for n, d in models.items()}
    plan.check_same_architecture(base_cfg, cfgs, base_dir)
    base = CheckpointReader(base_dir)
    readers = {n: CheckpointReader(d) for n, d in models.items()}
    for name, reader in readers.items():
        plan.check_same_keys(base.shapes(), reader.shapes(), str(base_dir), f"model {name!r}")
        for key in base.keys():
            if reader.dtype_name(key) != base.dtype_name(key):
                raise ValueError(f"model {name!r}: tensor {key} is {reader.dtype_name(key)}, "
                                 f"base has {base.dtype_name(key)}")
    if not has_tokenizer(tokenizer_dir):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files to copy into the merge "
                                f"(pass --tokenizer DIR)")
    check_same_tokenizer(tokenizer_dir, [d for d in models.values() if has_tokenizer(d)],
                         int(base_cfg["vocab_size"]))
    return base_cfg, base, readers


def merge_checkpoints(method: str, base_dir: str | Path, models: dict[str, Path],
                      out: str | Path, overwrite: bool = False, tokenizer: str | Path | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, **settings) -> Path:
    """Merge dense Llama dirs tensor by tensor into `out` (config/tokenizer from the base);
    `settings`: the method's own (e.g. ties: scale, density, trim_scope), the rest default."""
    from transformers import LlamaConfig
    base_dir, out = Path(base_dir), Path(out)
    models = {n: Path(d) for n, d in models.items()}
    merger = merge_method(method)
    settings = merger.check(settings, f"merge method {method!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
    tokenizer_dir = Path(tokenizer) if tokenizer else base_dir
    base_cfg, base, readers = _open_all(base_dir, models, tokenizer_dir)
    context = merger.context(list(base.keys()), base.get_finite,
                             [r.get_finite for r in readers.values()], settings)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for key in base.keys():
            tensors = [r.get_finite(key) for r in readers.values()]
            writer.add(key, merger(base.get_finite(key), tensors, settings, context))
        writer.close()
        LlamaConfig.from_pretrained(base_dir).save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_dir, tmp)
        copy_optional_files(base_dir, tmp, ["generation_config.json"])
        write_json(tmp / MANIFEST, {
            "tool": "merge", "method": method, **settings, **context,
            "base": {"path": str(base_dir.resolve()), "sha256": sha256_dir(base_dir)},
            "models": [{"name": n, "path": str(d.resolve()), "sha256": sha256_dir(d)}
                       for n, d in models.items()]})
    log.info("merge: wrote %s (%s of %s)", out, method, list(models))
    return out
