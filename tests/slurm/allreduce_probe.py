"""Worker for the SLURM launch test: a gloo all-reduce that proves rank/world/master wiring.

Each rank writes `<out>/rank<R>.json` with what it saw; the sum of (rank + 1) over all ranks
only comes out right when every rank joined the same process group.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.env import dist_backend, dist_env


def main(out_dir: str) -> int:
    env = dist_env()
    dist.init_process_group(backend=dist_backend(), rank=env.rank, world_size=env.world_size)
    value = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(value)
    record = {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
              "master": f"{env.master_addr}:{env.master_port}", "backend": dist.get_backend(),
              "allreduce_sum": value.item(), "host": socket.gethostname(),
              "slurm_nodeid": os.environ.get("SLURM_NODEID"),
              "slurm_procid": os.environ.get("SLURM_PROCID")}
    print(f"probe rank={env.rank} world={env.world_size} sum={value.item()} "
          f"node={record['slurm_nodeid']}", flush=True)
    (Path(out_dir) / f"rank{env.rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
