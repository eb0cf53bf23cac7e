"""torch.distributed / DeepSpeed helpers; every function is a no-op in a single process."""

from __future__ import annotations

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
