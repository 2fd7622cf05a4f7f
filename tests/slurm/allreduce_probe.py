"""Worker for the SLURM launch test: a gloo all-reduce that proves rank/world/master wiring.

Each rank writes `<out>/rank<R>.json` with what it saw; the sum of (rank + 1) over all ranks
only comes out right when every rank joined the same process group. Local rank 0 of each node
also records its job step as SLURM sees it (`scontrol show step`: CPUs, TRES) and the argv of
the `srun` that started the step (read from /proc: the emulated nodes share one host).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.env import dist_backend, dist_env


def step_record() -> dict:
    """The step's allocation (`scontrol show step -o`) and its srun's command line."""
    step = f"{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
    shown = subprocess.run(["scontrol", "show", "step", "-o", step], capture_output=True,
                           text=True, check=True, timeout=30).stdout
    fields = dict(re.findall(r"(\S+?)=(\S*)", shown))
    pid = fields.get("SrunHost:Pid", "").rpartition(":")[2]
    cmdline = Path(f"/proc/{pid}/cmdline")
    argv = cmdline.read_bytes().decode().split("\0") if pid and cmdline.exists() else None
    return {"step_cpus": fields.get("CPUs"), "step_tres": fields.get("TRES"), "srun_argv": argv}


def main(out_dir: str) -> int:
    env = dist_env()
    dist.init_process_group(backend=dist_backend(), rank=env.rank, world_size=env.world_size)
    value = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(value)
    record = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
              "master": f"{env.master_addr}:{env.master_port}", "backend": dist.get_backend(),
              "allreduce_sum": value.item(), "host": socket.gethostname(),
              "slurm_nodeid": os.environ.get("SLURM_NODEID"),
              "slurm_procid": os.environ.get("SLURM_PROCID"),
              "slurm_cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
              **(step_record() if env.local_rank == 0 else {})}
    print(f"probe rank={env.rank} world={env.world_size} sum={value.item()} "
          f"node={record['slurm_nodeid']}", flush=True)
    (Path(out_dir) / f"rank{env.rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
