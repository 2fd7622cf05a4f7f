#!/usr/bin/env python
"""Which rank count and ZeRO stage trains fastest on this machine: the real stage commands, timed.

For each setting (ranks x threads per rank x ZeRO stage) this launches the stage exactly as
`h3fusion run` does (`python -m pipeline.commands.launch --standalone --nproc-per-node=N ... -m
pipeline.commands <stage>` for N > 1, plain `python -m pipeline.commands <stage>` for N = 1, with
OMP_NUM_THREADS = threads per rank) on a prepared run dir, for `--steps` optimizer steps, and
reports:

- steady s/step: the mean gap between the TensorBoard events of consecutive steps (rank 0 logs
  every step: `train.log_every=1`), the first `--skip` gaps (warm-up) left out;
- wall s: the launched command, start to exit (what `stage_times.json` counts);
- fixed s = wall - steps x steady: what a launch costs besides its steps (interpreter and
  imports on every rank, process group and DeepSpeed init, model load, tokenizing, the first
  step's extra, saving the output, exit); split into `before` (start to the end of step 1, minus
  one steady step) and `after` (end of the last step to exit).

Every setting keeps the config's global batch: micro batch x num_procs / ranks (2 ranks x 16
rows -> 1 rank x 32 rows), so all settings run the same steps over the same rows.
Stages: `expert` (train-expert, `--zero` 3 and/or 2: ds_configs/zero{3,2}_expert.json),
`multitask` (train-baseline --kind multitask --variant data_matched: the plan's full step count,
the stage-1 trainer on the union; `--zero` as expert) and `fusion` (fuse, its own ds_config).
The input run dir is only read: every launch writes into a fresh scratch run dir under `--work`
whose data / tokenizer / base / fused_init are symlinks to the input's, removed afterwards.
Settings run round-robin `--repeats` times; each launch prints the load average before and after
it and the share of the CPUs other processes used meanwhile (/proc/stat minus the launch's own
rusage): on a shared machine a rank with 2 OpenMP threads loses far more to another busy
process than two 1-thread ranks do, so compare settings only at similar shares (`--quiet`
waits for a quiet machine before each launch).

  python tools/profiling/rank_choice.py --run-dir runs/tiny --stages expert multitask fusion \\
      --steps 20 --repeats 2 --quiet 0.05 --quiet-wait 600 --json /tmp/rank_tiny.json
  python tools/profiling/rank_choice.py --run-dir runs/smollm2 --stages expert fusion --steps 6 \\
      --repeats 1 --quiet 0.05 --quiet-wait 600 --json /tmp/rank_smollm2.json
  python tools/profiling/rank_choice.py --table-from /tmp/rank_tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # runnable from a checkout

STAGES = ("expert", "multitask", "fusion")
ZERO_CONFIGS = {3: "ds_configs/zero3_expert.json", 2: "ds_configs/zero2_expert.json"}
LINKED = ("data", "tokenizer", "base", "fused_init")   # inputs the timed stages read
NEEDS = {"expert": ("data", "base"), "multitask": ("data", "base"),
         "fusion": ("data", "fused_init")}


class Setting(NamedTuple):
    stage: str
    ranks: int
    threads: int          # OMP_NUM_THREADS of each rank
    zero: Optional[int]   # expert/multitask: ZeRO stage of the expert DS config; fusion: None

    @property
    def label(self) -> str:
        zero = f"ZeRO-{self.zero}" if self.zero else "own DS config"
        return f"{self.stage} {self.ranks} rank x {self.threads} thr, {zero}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="prepared run dir (read only)")
    p.add_argument("--config", default=None, help="default: <run-dir>/resolved_config.yaml")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=["expert", "fusion"])
    p.add_argument("--dimension", default=None, help="expert stage's dimension (default: 1st)")
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 1])
    p.add_argument("--zero", nargs="+", type=int, choices=sorted(ZERO_CONFIGS), default=[3, 2])
    p.add_argument("--steps", type=int, default=12, help="steps per launch (expert, fusion)")
    p.add_argument("--skip", type=int, default=1, help="step gaps left out as warm-up")
    p.add_argument("--repeats", type=int, default=2, help="round-robin passes over the settings")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="threads per rank = cores // ranks")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of every launch, e.g. OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--quiet", type=float, default=None, metavar="SHARE",
                   help="before each launch wait (at most --quiet-wait s) until other processes "
                        "use less than SHARE of the CPUs over a 2 s probe")
    p.add_argument("--quiet-wait", type=float, default=120.0)
    p.add_argument("--max-others", type=float, default=0.05, metavar="SHARE",
                   help="the table takes only launches during which other processes used at "
                        "most SHARE of the CPUs (every launch is printed and in --json)")
    p.add_argument("--work", default=None, help="parent of the scratch run dirs (default: tmp)")
    p.add_argument("--log-dir", default=None, help="keep each launch's output here")
    p.add_argument("--json", default=None, help="also write every launch and the table here")
    p.add_argument("--table-from", nargs="+", metavar="JSON",
                   help="launch nothing: print the table of these --json files' launches")
    args = p.parse_args(argv)
    if not args.run_dir and not args.table_from:
        p.error("--run-dir is required (or --table-from)")
    if args.steps < args.skip + 2 or args.skip < 0 or args.repeats < 1:
        p.error("need --steps >= --skip + 2, --skip >= 0 and --repeats >= 1")
    if any(r < 1 or r > args.cores for r in args.ranks):
        p.error(f"--ranks must be in [1, --cores={args.cores}]")
    if any("=" not in kv for kv in args.env):
        p.error("--env takes KEY=VALUE")
    return args


# ----------------------------------------------------------------------------- commands (pure)

def settings_for(stages, ranks, zeros, cores: int) -> list[Setting]:
    """Every (stage, ranks, ZeRO) combination; fusion keeps its own DS config (zero None)."""
    out = []
    for stage in stages:
        for r in ranks:
            for z in (zeros if stage != "fusion" else [None]):
                out.append(Setting(stage, r, max(1, cores // r), z))
    return out


def scaled_micro(micro: int, procs: int, ranks: int, key: str) -> int:
    """The micro batch that keeps `micro x procs` rows per step on `ranks` ranks."""
    if (micro * procs) % ranks:
        raise ValueError(f"{key}={micro} x {procs} procs is not divisible by {ranks} ranks: the "
                         f"global batch cannot stay the same")
    return micro * procs // ranks


def overrides(s: Setting, cfg, steps: int) -> list[str]:
    """The `--set` values of one setting: rank count, the batch that keeps the global batch, a
    log line every step, the DS config (expert/multitask) and the step cap (not multitask: its
    plan fixes its steps)."""
    section = "fusion" if s.stage == "fusion" else "expert"
    sec = getattr(cfg, section)
    micro = scaled_micro(sec.train.micro_batch_size, sec.num_procs, s.ranks,
                         f"{section}.train.micro_batch_size")
    out = [f"{section}.num_procs={s.ranks}", f"{section}.train.micro_batch_size={micro}",
           f"{section}.train.log_every=1"]
    if s.zero is not None:
        out.append(f"expert.ds_config={ZERO_CONFIGS[s.zero]}")
    if s.stage != "multitask":
        out.append(f"{section}.train.max_steps={steps}")
    return out


def stage_argv(stage: str, dimension: str) -> list[str]:
    return {"expert": ["train-expert", "--dimension", dimension],
            "multitask": ["train-baseline", "--kind", "multitask", "--variant", "data_matched"],
            "fusion": ["fuse"]}[stage]


def check_inputs(run_dir: Path, stages) -> None:
    """The input run dir holds what every chosen stage reads (before any launch)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run-dir {run_dir}: not a directory")
    missing = sorted({f"{run_dir / name} (stage {stage})" for stage in stages
                      for name in NEEDS[stage] if not (run_dir / name).exists()})
    if missing:
        raise FileNotFoundError(f"--run-dir lacks what the stages read: {', '.join(missing)}")


def launch_argv(s: Setting, dimension: str, config: str, run_dir: str, sets: list[str],
                port: int, python: str = sys.executable) -> list[str]:
    """The command `h3fusion run` starts for this stage (pipeline.stages.stage_command)."""
    from pipeline.stages import launcher_argv

    launcher = launcher_argv(s.ranks, port, python)
    extra = [a for kv in sets for a in ("--set", kv)]
    return (launcher + stage_argv(s.stage, dimension) + ["--config", config, "--run-dir", run_dir]
            + extra)


def launch_env(s: Setting, port: int, base: dict, extra: list[str] = ()) -> dict:
    """`h3fusion run`'s stage environment with this setting's threads and `extra` KEY=VALUEs; a
    one-rank stage gets a free MASTER_PORT too (its process group would otherwise take 29500,
    which another process may hold)."""
    env = dict(base, OMP_NUM_THREADS=str(s.threads), TOKENIZERS_PARALLELISM="false")
    env.update(kv.split("=", 1) for kv in extra)
    if s.ranks == 1:
        env["MASTER_PORT"] = str(port)
    return env


# ----------------------------------------------------------------------------- timing (pure)

def steady_step_s(step_times: list[float], skip: int) -> float:
    """Mean gap between consecutive step-end times, the first `skip` gaps left out."""
    gaps = [b - a for a, b in zip(step_times, step_times[1:])][skip:]
    if not gaps:
        raise ValueError(f"{len(step_times)} step times leave no gap after skipping {skip}")
    return sum(gaps) / len(gaps)


def launch_summary(t_start: float, t_end: float, step_times: list[float], skip: int) -> dict:
    steady = steady_step_s(step_times, skip)
    wall = t_end - t_start
    return {"steps": len(step_times), "steady_s_per_step": steady, "wall_s": wall,
            "fixed_s": wall - len(step_times) * steady,
            "before_s": step_times[0] - t_start - steady, "after_s": t_end - step_times[-1]}


def others_share(busy_s: float, ours_s: float, wall_s: float, cores: int) -> float:
    """The share of the machine's CPU time that other processes used over `wall_s`: all busy
    CPU seconds (/proc/stat) minus this launch's own (its processes' rusage)."""
    return max(0.0, busy_s - ours_s) / (wall_s * cores)


def table(records: list[dict], max_others: float = 1.0) -> str:
    """One row per setting: medians over its launches during which other processes used at most
    `max_others` of the CPUs (markdown); a setting with none left says so."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["label"], [])
        if r["others_cpu"] <= max_others:
            by[r["label"]].append(r)
    lines = ["| setting | launches | steps | steady s/step | steps/s | wall s | fixed s "
             "(before + after) | largest process MiB | others' CPU share | load 1m before -> "
             "after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rs in by.items():
        if not rs:
            lines.append(f"| {label} | 0 (others' CPU share > {max_others} in every launch) |"
                         + " |" * 8)
            continue
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("steady_s_per_step", "wall_s", "fixed_s", "before_s", "after_s")}
        loads = ", ".join(f"{r['load_before']:.2f}->{r['load_after']:.2f}" for r in rs)
        others = ", ".join(f"{r['others_cpu']:.2f}" for r in rs)
        rss = [r["max_rss_mib"] for r in rs if r.get("max_rss_mib")]
        rss = f"{statistics.median(rss):.0f}" if rss else "-"
        lines.append(f"| {label} | {len(rs)} | {rs[0]['steps']} | {med['steady_s_per_step']:.3f} | "
                     f"{1 / med['steady_s_per_step']:.2f} | {med['wall_s']:.1f} | "
                     f"{med['fixed_s']:.1f} ({med['before_s']:.1f} + {med['after_s']:.1f}) | "
                     f"{rss} | {others} | {loads} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running

def tensorboard_step_times(tb_root: Path) -> list[float]:
    """Wall time of each logged step (earliest event of that step over all scalar tags)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first: dict[int, float] = {}
    for events in sorted(tb_root.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                first[e.step] = min(first.get(e.step, e.wall_time), e.wall_time)
    return [first[k] for k in sorted(first)]


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """Run `cmd`; (exit status, CPU seconds of it and its descendants, the largest resident
    peak among them in MiB), from wait4's rusage."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def wait_for_quiet(share: float, max_wait: float, cores: int, probe: float = 2.0) -> float:
    """Seconds waited until other processes used < `share` of the CPUs over one probe."""
    t0 = time.time()
    while True:
        busy = cpu_busy_s()
        time.sleep(probe)
        if (cpu_busy_s() - busy) / (probe * cores) < share or time.time() - t0 > max_wait:
            return time.time() - t0


def scratch_run(src: Path, parent: Path) -> Path:
    """A fresh run dir whose inputs are symlinks to `src`'s (outputs land in the scratch dir)."""
    run = Path(tempfile.mkdtemp(prefix="rank_choice_", dir=parent))
    for name in LINKED:
        if (src / name).exists():
            (run / name).symlink_to((src / name).resolve())
    return run


def run_once(s: Setting, args, cfg, config: str, dimension: str, parent: Path, i: int) -> dict:
    from pipeline.env import free_port
    from pipeline.timing import load_avg_1m

    waited = wait_for_quiet(args.quiet, args.quiet_wait, args.cores) if args.quiet else 0.0
    run, port = scratch_run(Path(args.run_dir), parent), free_port()
    cmd = launch_argv(s, dimension, config, str(run), overrides(s, cfg, args.steps), port)
    log = (Path(args.log_dir) / f"{i:02d}_{s.stage}_{s.ranks}r_z{s.zero}.log") if args.log_dir \
        else run / "launch.log"
    rc = None
    try:
        load_before, busy0, t0 = load_avg_1m(), cpu_busy_s(), time.time()
        rc, ours, rss = run_measured(cmd, launch_env(s, port, dict(os.environ), args.env), log)
        t1, load_after = time.time(), load_avg_1m()
        if rc != 0:
            raise RuntimeError(f"{s.label}: exit status {rc}; its output: {log}")
        times = tensorboard_step_times(run / "tensorboard")
    finally:   # a failed launch keeps its scratch dir when the log lies in it
        if rc == 0 or args.log_dir:
            shutil.rmtree(run, ignore_errors=True)
    others = others_share(cpu_busy_s() - busy0, ours, t1 - t0, args.cores)
    record = {"label": f"{cfg.name} {s.label}", **s._asdict(), "load_before": load_before,
              "load_after": load_after, "others_cpu": others, "waited_s": waited, "cpu_s": ours,
              "max_rss_mib": rss, "step_end_times": [t - t0 for t in times],
              **launch_summary(t0, t1, times, args.skip)}
    print(f"  {s.label}: {record['steady_s_per_step']:.3f} s/step, wall {record['wall_s']:.1f} s, "
          f"fixed {record['fixed_s']:.1f} s, others' CPU {others:.2f}, load {load_before:.2f} -> "
          f"{load_after:.2f}", flush=True)
    return record


def import_cost(python: str = sys.executable) -> dict:
    """Seconds one process spends importing what every rank of a training stage imports, and
    the 2-rank launcher around ranks that do nothing (`--no-python true`)."""
    from pipeline.env import free_port

    out = {}
    for name, argv in (("python", ["-c", "pass"]), ("torch", ["-c", "import torch"]),
                       ("torch+transformers+deepspeed",
                        ["-c", "import torch, transformers, deepspeed; "
                               "from transformers import AutoModelForCausalLM"]),
                       ("pipeline.commands.launch", ["-c", "import pipeline.commands.launch"]),
                       ("launcher+2 no-op ranks",
                        ["-m", "pipeline.commands.launch", "--standalone", "--nproc-per-node=2",
                         f"--master-port={free_port()}", "--no-python", "true"])):
        t0 = time.time()
        subprocess.run([python, *argv], cwd=REPO, check=True, capture_output=True)
        out[name] = round(time.time() - t0, 2)
    return out


def save(path: Optional[str], meta: dict, records: list[dict], max_others: float) -> str:
    text = table(records, max_others)
    if path:
        Path(path).write_text(json.dumps({**meta, "records": records, "table": text}, indent=1))
    return text


def main(argv=None) -> int:
    from pipeline.config import load_config

    args = parse_args(argv)
    if args.table_from:   # print the table of saved launches (several files: pooled)
        records = []
        for path in args.table_from:
            saved = json.loads(Path(path).read_text())
            name = saved.get("preset") or Path(saved["run_dir"]).name
            records += [{**r, "label": r["label"] if r["label"].startswith(name + " ")
                         else f"{name} {r['label']}"} for r in saved["records"]]
        print(table(records, args.max_others))
        return 0
    config = args.config or str(Path(args.run_dir) / "resolved_config.yaml")
    settings = settings_for(args.stages, args.ranks, args.zero, args.cores)
    try:   # bad input: one line, before any launch
        check_inputs(Path(args.run_dir), args.stages)
        cfg = load_config(config)
        dimension = args.dimension or cfg.dimensions[0]
        if dimension not in cfg.dimensions:
            raise ValueError(f"--dimension {dimension!r}: not one of {cfg.dimensions}")
        for s in settings:
            overrides(s, cfg, args.steps)
    except (ValueError, FileNotFoundError) as exc:   # ConfigError is a ValueError
        print(f"rank_choice.py: error: {exc}", file=sys.stderr)
        return 2
    parent = Path(args.work or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    meta = {"run_dir": args.run_dir, "preset": cfg.name, "config": config, "dimension": dimension,
            "env": args.env, "imports_s": import_cost()}
    print(f"import seconds: {meta['imports_s']}", flush=True)
    records = []
    for rep in range(args.repeats):
        print(f"pass {rep + 1}/{args.repeats}", flush=True)
        for s in settings:
            records.append(run_once(s, args, cfg, config, dimension, parent, len(records)))
            save(args.json, meta, records, args.max_others)   # a cut-short run keeps its launches
    print(f"load average after: {os.getloadavg()}")
    print(f"launches with other processes using <= {args.max_others} of the CPUs:")
    print(save(args.json, meta, records, args.max_others))
    return 0


if __name__ == "__main__":
    sys.exit(main())
