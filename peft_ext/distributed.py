"""torch.distributed / DeepSpeed helpers; every function is a no-op in a single process."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world_size), (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_backend_device(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """NCCL reduces CUDA tensors only: move a CPU tensor there and back (gloo takes both)."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device())), True
    return t, False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks, in place; returns `t`."""
    if dist_info()[1] > 1:
        work, moved = _on_backend_device(t)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if moved:
            t.copy_(work)
    return t


def all_reduce_max(value: int) -> int:
    if dist_info()[1] == 1:
        return value
    t, _ = _on_backend_device(torch.tensor([value], dtype=torch.long))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` on every rank with rank `src`'s value, in place; returns `t`."""
    if dist_info()[1] > 1:
        work, moved = _on_backend_device(t.contiguous())
        dist.broadcast(work, src=src)
        if moved or work.data_ptr() != t.data_ptr():
            t.copy_(work)
    return t


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the model's parameters (they carry `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def zero3_gather_hooks(model: torch.nn.Module) -> list:
    """Forward hooks that gather each module's own ZeRO-3 partitioned parameters while it runs and release them after.

    Lets a partitioned model run forward passes before (or without) the DeepSpeed engine, e.g. for CorDA calibration,
    holding only one module's full weights at a time. Every rank must run the same forward passes (collectives).
    Returns the hook handles; remove them when done.
    """
    import deepspeed

    handles, open_ctx = [], {}
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        if not params:
            continue

        def pre_hook(mod, args, _params=params):
            ctx = deepspeed.zero.GatheredParameters(_params, modifier_rank=None)
            ctx.__enter__()
            open_ctx.setdefault(id(mod), []).append(ctx)

        def post_hook(mod, args, output):
            open_ctx[id(mod)].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    return handles


@contextmanager
def gathered_forward(model: torch.nn.Module):
    """Forward passes through a ZeRO-3 partitioned model outside its engine (see `zero3_gather_hooks`); a no-op for
    other models."""
    handles = zero3_gather_hooks(model) if is_zero3_partitioned(model) else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reduce_sum_to_(t: torch.Tensor, dst: int) -> torch.Tensor:
    """Sum `t` over all ranks into rank `dst`'s copy, in place (the other ranks' copies are left undefined)."""
    if dist_info()[1] > 1:
        work, moved = _on_backend_device(t)
        dist.reduce(work, dst=dst, op=dist.ReduceOp.SUM)
        if moved and dist.get_rank() == dst:
            t.copy_(work)
    return t


@contextmanager
def gathered_module(module: torch.nn.Module):
    """All of one module's ZeRO-3 partitioned parameters gathered on every rank for the duration (read only); a
    no-op for other modules. A collective: every rank must enter it for the same module."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
