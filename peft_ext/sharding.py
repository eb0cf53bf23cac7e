"""Decompositions sharded over the ranks of a process group: each rank computes about 1/world of them (balanced by
cost), then every result is broadcast from the rank that owns it, so every rank ends with the same factors.

    jobs (same list, same order on every rank)
        ─▶ owners: longest job first, to the least-loaded rank (deterministic, no communication)
        ─▶ phase 1: for each job, its gather context on every rank (ZeRO-3 gathers are collectives); its owner computes
        ─▶ phase 2: any rank's error is raised on every rank (no rank is left waiting in a broadcast)
        ─▶ phase 3: each job's tensors broadcast from its owner

Single process: every job is computed here, in order, with no communication.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .distributed import broadcast_, dist_info


def decomposition_cost(out_features: int, in_features: int) -> float:
    """≈ FLOPs of one decomposition of an out × in matrix: min(out, in)²·max(out, in)."""
    small, large = sorted((out_features, in_features))
    return float(small) * small * large


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The rank that computes each job: jobs in decreasing cost go to the rank with the least work so far (ties: the
    earlier job, the lower rank), so the ranks' totals differ by at most one job. The same on every rank."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


@dataclass
class Job:
    """One decomposition. `compute` runs on the owner only and returns tensors of `shapes` (float32 or `dtype`);
    `gather` is entered by every rank (e.g. a ZeRO-3 weight gather) around the owner's compute."""

    name: str
    cost: float
    shapes: tuple[tuple[int, ...], ...]
    compute: Callable[[], tuple[torch.Tensor, ...]]
    gather: Callable[[], ContextManager] = contextlib.nullcontext
    dtype: torch.dtype = torch.float32
    device: Optional[torch.device] = None


def run_sharded(jobs: Sequence[Job], *, desc: str = "peft_ext decompositions", verbose: bool = True,
                owners: Optional[Sequence[int]] = None) -> list[tuple[torch.Tensor, ...]]:
    """Every job's result on every rank (see the module docstring). `owners` overrides the balanced assignment."""
    rank, world = dist_info()
    owners = list(owners) if owners is not None else assign_owners([j.cost for j in jobs], world)
    mine = sum(o == rank for o in owners)
    results: list[Optional[tuple[torch.Tensor, ...]]] = [None] * len(jobs)
    error: Optional[BaseException] = None
    with tqdm(total=mine, desc=desc if world == 1 else f"{desc} (rank {rank}: {mine} of {len(jobs)})",
              unit="layer", disable=not verbose, leave=False) as bar:
        for i, job in enumerate(jobs):
            with job.gather():
                if owners[i] == rank and error is None:
                    try:
                        results[i] = tuple(t.contiguous() for t in job.compute())
                    except Exception as exc:  # raised below on every rank, after the others finish their gathers
                        error = exc
                    bar.update(1)
    _raise_on_every_rank(error, jobs, owners)
    if world > 1:
        for i, job in enumerate(jobs):
            if owners[i] != rank:
                results[i] = tuple(torch.empty(s, dtype=job.dtype, device=job.device) for s in job.shapes)
            for t in results[i]:
                broadcast_(t, src=owners[i])
    return results  # type: ignore[return-value]


def _raise_on_every_rank(error: Optional[BaseException], jobs: Sequence[Job], owners: Sequence[int]) -> None:
    rank, world = dist_info()
    if world == 1:
        if error is not None:
            raise error
        return
    messages: list = [None] * world
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if failed is not None:
        raise RuntimeError(f"peft_ext: rank {failed[0]} failed in its share of the decompositions, so no rank "
                           f"continues: {failed[1]}")
