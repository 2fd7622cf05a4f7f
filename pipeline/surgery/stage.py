"""The surgery stages, run-level (`h3fusion run`): each takes a run directory's config and
outputs, and writes one run output.

- build_moe: `build_moe(base, experts, out, top_k, router_init, ...)` (pipeline.surgery.build_moe;
  `h3fusion surgery build_moe`, argv from pipeline.stages) -> <run>/fused_init;
- merge: `merge_run_experts(cfg, run_dir)` -> <run>/merges/<method> per `merge.methods`
  (`h3fusion merge`), each method's maths and settings in pipeline.surgery.merging.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint.tokenizer_check import has_tokenizer
from ..io_utils import is_complete, read_json
from ..layout import RunLayout
from .build_moe import build_moe  # noqa: F401  (the build_moe stage's entry point)
from .merging import MANIFEST, MergeMethod, merge_checkpoints, merge_method


def merge_run_experts(cfg, run_dir: str | Path, methods: list[str] | None = None,
                      overwrite: bool = False, log=print) -> None:
    """Merge the run's experts (config `dimensions` order) onto its base, one output dir per
    method (`methods`, default the config's `merge.methods`), each with its settings from the
    config's merge section; `cfg` is the whole PipelineConfig."""
    layout = RunLayout.at(run_dir)
    experts = {dim: layout.expert(dim) for dim in cfg.dimensions}
    tokenizer = layout.base if has_tokenizer(layout.base) else layout.tokenizer
    for method in methods or cfg.merge.methods:
        merger = merge_method(method)
        want = merger.config_settings(cfg.merge)
        redo = overwrite
        if is_complete(layout.merge(method), MANIFEST) and not overwrite:
            # outputs are atomic, so a dir with its manifest is a finished merge: resume past
            # it, unless it was made with other settings (e.g. before merge.ties_trim_scope)
            stale = _changed_settings(layout.merge(method) / MANIFEST, merger, want)
            if not stale:
                log(f"h3fusion merge: {method}: {layout.merge(method)} is complete, skipping "
                    f"(--overwrite to redo)")
                continue
            log(f"h3fusion merge: {method}: {layout.merge(method)} was made with other "
                f"{', '.join(stale)}; redoing it")
            redo = True
        merge_checkpoints(method, layout.base, experts, layout.merge(method), overwrite=redo,
                          tokenizer=tokenizer, **want)
        log(f"h3fusion merge: {method} -> {layout.merge(method)}")


def _changed_settings(manifest: Path, merger: MergeMethod, want: dict) -> list[str]:
    """The method's settings whose value in a finished merge's manifest differs from `want`
    (a setting the manifest lacks counts as its `absent` value: a ties manifest without
    `trim_scope` predates the option and trimmed per tensor)."""
    got = read_json(manifest)
    return [s.name for s in merger.settings if got.get(s.name, s.absent) != want[s.name]]
