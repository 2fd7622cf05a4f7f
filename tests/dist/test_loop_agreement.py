"""pipeline.train.loop over 2 real gloo processes: a non-finite loss on ONE rank stops every rank
at the same step (nobody hangs in a collective), and a stop signal seen by ONE rank makes every
rank checkpoint at the same step and return "stopped"."""
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.env import free_port

pytestmark = pytest.mark.dist
WORLD = 2



class _Task:
    """A linear least-squares toy: enough to drive the loop's steps, guard and checkpoints."""

    def batch(self, step, micro):
        return {"x": torch.ones(2, 3) * (step + 1)}

    def loss(self, engine, batch):
        loss = engine(x=batch["x"]).pow(2).mean()
        return loss, {"mse": loss}

    def observe(self, batch, terms):
        pass

    def end_step(self, loop, micro_losses, step_s):
        return {"step": loop.step}

    def client_state(self):
        return {}

    def restore(self, client_state):
        pass


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)


class _Checkpoints:
    dir = Path("/ckpts")

    def __init__(self):
        self.saved = []

    def latest(self):
        return self.saved[-1] if self.saved else None

    def save(self, tag, client_state, rank_state):
        dist.barrier()   # a collective, as DeepSpeed's save is: a rank that is not here hangs
        self.saved.append(tag)

    def load(self):
        raise AssertionError("not resumed in this test")


def _loop(on_step_end=None, stop=None):
    from pipeline.train.loop import LoopSettings, TorchEngine, TrainLoop

    torch.manual_seed(0)
    model = _Model()
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.01), lambda s: 0.01, 2, 0)
    return TrainLoop(engine, _Task(), LoopSettings(total_steps=6, grad_accum_steps=2, save_every=2),
                     _Checkpoints(), stop=stop, on_step_end=on_step_end)


def _nan_case(rank: int) -> dict:
    from pipeline.train.loop import NonFiniteLossError

    def poison(loop):
        if loop.step == 3 and rank == 1:
            with torch.no_grad():
                loop.engine.module.lin.weight.fill_(float("nan"))

    loop = _loop(on_step_end=poison)
    try:
        loop.run()
        return {"error": None}
    except NonFiniteLossError as exc:
        return {"error": str(exc), "step": loop.step, "saved": loop.checkpoints.saved}


def _stop_case(rank: int) -> dict:
    from pipeline.train.signals import StopRequest

    stop = StopRequest()

    def signal_rank0(loop):
        if loop.step == 3 and rank == 0:
            stop.signum = 10   # as the SIGUSR1 handler would record it

    loop = _loop(on_step_end=signal_rank0, stop=stop)
    return {"status": loop.run(), "step": loop.step, "saved": loop.checkpoints.saved}


def _worker(rank: int, port: int, results) -> None:
    # a short timeout: ranks that disagree would otherwise wait in a collective for 30 minutes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results.put((rank, "nan", _nan_case(rank)))
        results.put((rank, "stop", _stop_case(rank)))
    except Exception as exc:  # reported to the parent's assertions
        results.put((rank, "crash", repr(exc)))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_non_finite_loss_and_on_stop_signals():
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(free_port(), results), nprocs=WORLD, start_method="spawn",
                       join=True)
    got = {}
    while not results.empty():
        rank, case, value = results.get()
        got[(rank, case)] = value
    assert not [v for (r, c), v in got.items() if c == "crash"], got
    for rank in range(WORLD):
        nan = got[(rank, "nan")]
        assert nan["error"] and "at step 4" in nan["error"], (rank, nan)
        assert "last good checkpoint: /ckpts/step0000002" in nan["error"], (rank, nan)
        # only rank 1's weights hold the NaN; both ranks name it
        assert "parameter lin.weight holds NaN/inf after 3 optimizer steps" in nan["error"], nan
        assert nan["step"] == 3 and nan["saved"] == ["step0000002"]
        stop = got[(rank, "stop")]
        assert stop == {"status": "stopped", "step": 3,
                        "saved": ["step0000002", "step0000003"]}, (rank, stop)
