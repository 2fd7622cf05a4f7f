"""Python side of slurm/lib.sh: config resolution and the stage graph, from the one definition.

The batch scripts never restate stage arguments or output paths; they ask `pipeline.stages`
(the graph `h3fusion run` also executes) through this helper:

    python slurm/stage_info.py resolve SRC OUT [--must-match] [--device=MODE[:NPROC]] [--fetch-hub]
                                       [KEY=VALUE ...]
        load the preset/YAML SRC with the overrides, validate, write the resolved YAML to OUT
        (atomically). --must-match: OUT may already exist only with identical content.
        --device=cuda:N (lib.sh's GPU mode): torch must see N GPUs here (else one error naming
        why: CPU-only torch build, CUDA_VISIBLE_DEVICES, driver); --device=cpu: the config must
        not need CUDA (fusion.moe_backend=megablocks does). Checked before OUT is written.
        --fetch-hub (slurm/pipeline.sh, on the login node, which usually has network where
        compute nodes have none): fetch every hub model (`hf:` base/tokenizer) into the HF
        cache now, or fail with the hub's one-line error before any job is submitted.
    python slurm/stage_info.py argv CONFIG RUN_DIR STAGE    # h3fusion argv, one item per line
    python slurm/stage_info.py done CONFIG RUN_DIR STAGE    # exit 0 when the outputs exist
    python slurm/stage_info.py dimensions CONFIG             # the run's dimensions, one per line
                                                             # (stage 1's array task i = line i)
    python slurm/stage_info.py baselines CONFIG RUN_DIR      # enabled training-baseline stages

Errors are one line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, dump_yaml, load_config
from pipeline.env import require_cuda
from pipeline.layout import RunLayout
from pipeline.stages import Stage, baseline_stages, cuda_needs, is_done, pipeline_stages


def check_device(src: str, cfg, device: str) -> None:
    """lib.sh's device mode against this machine and the config, before any job step."""
    mode, _, nproc = device.partition(":")
    if mode == "cuda":
        require_cuda(f"GPU mode (H3F_DEVICE=cuda, {nproc or 1} process(es) per node)",
                     min_devices=int(nproc or 1))
    elif mode == "cpu":
        needs = cuda_needs(cfg)
        if needs:
            raise ValueError(f"{src}: {', '.join(needs)} runs only on CUDA GPUs, but this runs "
                             f"in CPU mode (H3F_GPUS_PER_NODE=0): submit to GPU nodes with "
                             f"--gpus-per-node=<N>, or set H3F_MOE_BACKEND=torch")
    else:
        raise ValueError(f"--device={device}: expected cuda[:NPROC] or cpu")


def resolve(src: str, out: str, overrides: list[str], must_match: bool,
            device: str | None = None, fetch_hub: bool = False) -> None:
    cfg = load_config(src, overrides)
    if device:
        check_device(src, cfg, device)
    if fetch_hub:
        from pipeline.checkpoint.hub import resolve_config_models
        resolve_config_models(cfg, log=lambda line: print(f"h3fusion-slurm: {line}", file=sys.stderr))
    text = dump_yaml(cfg)
    target = Path(out)
    if must_match and target.exists() and target.read_text() != text:
        raise ValueError(f"{target} holds a different config than {src} + overrides give; "
                         f"use a new run dir, or delete that file to start the run over")
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(target)  # atomic: a concurrent reader sees the old or the new file, never half


def find_stage(config: str, run_dir: str, name: str) -> Stage:
    stages = pipeline_stages(load_config(config), RunLayout.at(Path(run_dir).resolve()))
    for stage in stages:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r} (stages: {[s.name for s in stages]})")


def stage_argv(config: str, run_dir: str, name: str) -> list[str]:
    stage = find_stage(config, run_dir, name)
    common = ["--config", config, "--run-dir", run_dir] if stage.takes_config else []
    return list(stage.argv) + common


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("resolve", "argv", "done", "dimensions", "baselines"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "resolve":
        must_match, fetch_hub = "--must-match" in rest, "--fetch-hub" in rest
        device = next((a.split("=", 1)[1] for a in rest if a.startswith("--device=")), None)
        rest = [a for a in rest if a not in ("--must-match", "--fetch-hub")
                and not a.startswith("--device=")]
        if len(rest) < 2:
            raise ValueError("resolve needs SRC OUT [KEY=VALUE ...]")
        resolve(rest[0], rest[1], rest[2:], must_match, device, fetch_hub)
        return 0
    if cmd == "dimensions":
        if len(rest) != 1:
            raise ValueError(f"dimensions needs CONFIG, got {rest}")
        print("\n".join(load_config(rest[0]).dimensions))
        return 0
    if cmd == "baselines":
        if len(rest) != 2:
            raise ValueError(f"baselines needs CONFIG RUN_DIR, got {rest}")
        print("\n".join(s.name for s in baseline_stages(load_config(rest[0]), RunLayout.at(rest[1]))))
        return 0
    if len(rest) != 3:
        raise ValueError(f"{cmd} needs CONFIG RUN_DIR STAGE, got {rest}")
    if cmd == "argv":
        print("\n".join(stage_argv(*rest)))
        return 0
    return 0 if is_done(find_stage(*rest)) else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"h3fusion-slurm: error: {exc}", file=sys.stderr)
        sys.exit(2)
