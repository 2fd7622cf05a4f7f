"""Which GPU backends can run on this machine, and skip-or-fail for the tests in tests/gpu.

A test of backend X calls `require("X")` first. Without a GPU (or without X) it SKIPS with the
reason, unless X is named in H3F_REQUIRE_GPU_BACKENDS (`pipeline.env.required_gpu_backends`):
then it FAILS with the reason, so a GPU run that was meant to exercise X cannot turn green by
skipping it (tools/gpu/check.sh names every backend). No tests here; imported by the tests.
"""
from __future__ import annotations

import atexit
import importlib

import pytest
import torch

from pipeline.env import REQUIRE_GPU_BACKENDS, free_port, required_gpu_backends

# what tests/gpu can require: the torch backend's two expert implementations, MegaBlocks,
# NCCL (expert-parallel all-to-all) and the DeepSpeed bf16 engine
KNOWN = ("loop", "grouped_mm", "megablocks", "nccl", "deepspeed")
NO_CUDA = "a CUDA GPU (torch.cuda.is_available() is False)"


def grouped_mm_missing() -> str | None:
    """Why `torch._grouped_mm` (the torch backend's grouped_mm path) cannot run here in bf16 at
    the sizes these tests use (pipeline.model.routing.grouped_mm_unavailable's answer)."""
    from pipeline.model.routing import grouped_mm_unavailable
    if not torch.cuda.is_available():
        return NO_CUDA
    return grouped_mm_unavailable("cuda", torch.bfloat16, 256, 128)


def _import_missing(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:   # ImportError, or a broken install failing at import time
        return f"an importable '{module}' ({type(exc).__name__}: {exc})"
    return None


def missing(name: str) -> str | None:
    """Why backend `name` (one of KNOWN) cannot run here, or None when it can."""
    if name not in KNOWN:
        raise ValueError(f"unknown GPU backend {name!r}; known: {', '.join(KNOWN)}")
    if not torch.cuda.is_available():
        return NO_CUDA
    if name == "grouped_mm":
        return grouped_mm_missing()
    if name == "megablocks":
        from pipeline.backends import megablocks_missing   # imports its compiled ops too
        return megablocks_missing()
    if name == "nccl":
        import torch.distributed as dist
        return None if dist.is_nccl_available() else "a torch built with NCCL"
    if name == "deepspeed":
        return _import_missing("deepspeed")
    return None   # "loop": plain CUDA matmuls


def required() -> frozenset[str]:
    """The required backend names; a name outside KNOWN is a typo that would silently require
    nothing, so it fails every test that asks."""
    names = required_gpu_backends()
    unknown = sorted(names - set(KNOWN))
    if unknown:
        pytest.fail(f"{REQUIRE_GPU_BACKENDS} names unknown backends {unknown}; known: "
                    f"{', '.join(KNOWN)}", pytrace=False)
    return names


def require(name: str) -> None:
    """Return when backend `name` can run here; else skip the calling test, or fail it when
    the backend is required."""
    names = required()   # first: a typo in the variable fails even where everything runs
    reason = missing(name)
    if reason is None:
        return
    if name in names:
        pytest.fail(f"GPU backend '{name}' is required ({REQUIRE_GPU_BACKENDS}) but cannot run "
                    f"here: needs {reason}", pytrace=False)
    pytest.skip(f"GPU backend '{name}' unavailable: needs {reason}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))



def world1_nccl_group():
    """The default process group of this pytest process: ONE rank on cuda:0 over NCCL (made once,
    shared by every test that needs a group; destroyed at exit)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, device_id=torch.device("cuda", 0))
        atexit.register(dist.destroy_process_group)
    assert dist.get_backend() == "nccl", f"default group is {dist.get_backend()}, not nccl"
    return dist.group.WORLD


# ----------------------------------------------------------------------------- MoE test cases
WEIGHTS = ("x", "router", "w1", "v1", "w2")


def moe_case(tokens: int, hidden: int, ffn: int, experts: int, top_k: int, seed: int) -> dict:
    """bf16 CUDA tensors x [T, H], router [E, H], w1/v1/w2 [E*F, H] (the MegaBlocks GLU layout).

    The T tokens are the clearest of 4*T random ones: the gap between their k-th and (k+1)-th
    router logit is the largest, so bf16 rounding cannot change which experts they pick and a
    bf16 backend and the fp32 reference route them alike (a flipped pick is not a kernel error).
    """
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    x = randn(4 * tokens, hidden, scale=1.0)
    case = {"router": randn(experts, hidden, scale=0.1)}
    for name in ("w1", "v1", "w2"):
        case[name] = randn(experts * ffn, hidden, scale=hidden ** -0.5)
    if top_k < experts:
        logits = (x.float() @ case["router"].float().T).sort(dim=-1, descending=True).values
        gap = logits[:, top_k - 1] - logits[:, top_k]
        keep = gap.argsort(descending=True)[:tokens]
        assert float(gap[keep].min()) > 0.05, "no clear routing margin: change the seed"
        x = x[keep]
    case["x"] = x[:tokens].contiguous()
    return case


def reference_fwd_bwd(case: dict, top_k: int, grad_out: torch.Tensor):
    """The naive per-token reference (pipeline.model.routing.naive_moe_reference) in fp32 on the
    case's bf16 values: output and the gradients of sum(out * grad_out) by WEIGHTS."""
    from pipeline.model.routing import naive_moe_reference
    leaves = {k: case[k].float().requires_grad_(True) for k in WEIGHTS}
    out = naive_moe_reference(*(leaves[k] for k in WEIGHTS), top_k=top_k)
    grads = torch.autograd.grad(out, [leaves[k] for k in WEIGHTS], grad_out.float())
    return out.detach(), dict(zip(WEIGHTS, grads))


def assert_grads_close(got: dict, ref: dict, top_k: int, tol: float) -> None:
    """rel_err(got[k], ref[k]) < tol for every name. With top-1 routing the renormalised weight
    is exactly 1, so a router ("router" in the name) gets no gradient from the output: there
    both must be ~0 next to the input's gradient (a relative error of two noises means nothing)."""
    scale = float(next(iter(ref.values())).detach().float().norm())
    for name, grad in got.items():
        if top_k == 1 and "router" in name:
            for which, g in (("backend", grad), ("reference", ref[name])):
                norm = float(g.detach().float().norm())
                assert norm < 1e-4 * scale, f"{name}: top-1 {which} gradient norm {norm}"
        else:
            assert rel_err(grad, ref[name]) < tol, name
