"""Block-by-block CorDA calibration: peak extra memory of one block's covariances, whatever the depth.

    capture the first block's inputs for every batch (`blocks.capture_first_block_inputs`)
    for each block:  (ZeRO-3: this block's weights gathered, no other)
        every batch through this block only, pre-hooks on its targets accumulating their covariances
        ─▶ sums reduced to the rank that decomposes them (all-reduced when a cache is written)
        ─▶ decomposed at once, sharded over the ranks (`sharding.run_sharded`) ─▶ init factors kept, covariances freed
        ─▶ the block's outputs are the next block's inputs

Exact: the init keeps every layer's output unchanged, so each block sees the same inputs as in a whole-model pass;
the factors equal those `get_peft_model` computes from whole-model covariances, up to rounding. With a cache folder,
each finished block's covariances are written to it, and a rerun reads them instead of calibrating those blocks again
(their forward still runs, to produce the next block's inputs).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .._compat import Conv1D
from ..base_weight import decomposable_weight, no_cpu_repacking
from ..distributed import (all_reduce_sum, dist_info, gathered_forward, gathered_module,
                           reduce_sum_to_)
from ..sharding import Job, assign_owners, decomposition_cost, run_sharded
from ..targets import check_rank_fits, rank_and_scaling, target_shape
from .blocks import Blocks, capture_first_block_inputs, run_block
from .cache import load_block_cache, save_block_cache
from .covariance import Calibration, Collector, CovarianceGroup, after_first_forward, diagnose, symmetrize
from .decomposition import decompose_member


def calibrate_sequential(model: nn.Module, config, blocks: Blocks, batches: list[dict], *, fingerprint: dict,
                         covariance_dtype: torch.dtype, sample_normalization: str, cache_dir: Optional[str],
                         hidden_device: Optional[torch.device], verbose: bool) -> Calibration:
    """The `Calibration` of `calibrate(..., sequential=True)`: init factors of every target, covariances freed."""
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    _check_ranks(config, modules, [n for names in blocks.targets for n in names])
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    settings = config.decomposition_settings()
    factors: dict = {}
    kept: list[CovarianceGroup] = []
    cached: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with no_cpu_repacking(model):
            with gathered_forward(model):
                inputs = capture_first_block_inputs(model, blocks.modules[0], batches, device, hidden_device, extra)
            masks = [b["attention_mask"].to(device).bool() for b in batches]
            for i in tqdm(range(len(blocks.modules)), desc="peft_ext CorDA calibration", unit="block",
                          disable=not verbose):
                where = f"{blocks.path}.{i}"
                with gathered_module(blocks.modules[i]):
                    groups = load_block_cache(cache_dir, i, fingerprint, device) if cache_dir else None
                    if groups is not None:
                        cached.append(i)
                    collector = None if groups is not None or not blocks.targets[i] else Collector(
                        blocks.targets[i], covariance_dtype, sample_normalization)
                    groups = _run_block(blocks.modules[i], where, blocks.targets[i], inputs, masks,
                                        collector) or groups
                    if groups:
                        _finish_block(groups, modules, config, settings, factors, cache_dir, i, fingerprint,
                                      write=i not in cached)
                kept.extend(groups or [])
    finally:
        model.train(was_training)
    return Calibration(kept, fingerprint, source="sequential", factors=factors, settings=settings,
                       cached_blocks=cached)


def _check_ranks(config, modules: dict, names: list[str]) -> None:
    """Refused before any forward: a rank the decomposition of a layer cannot have (as get_peft_model would)."""
    for name in names:
        shape = target_shape(modules[name])
        check_rank_fits("corda", rank_and_scaling(config, name, shape)[0], *shape, name)


def _run_block(block: nn.Module, where: str, names: list[str], inputs, masks: list[torch.Tensor],
               collector: Optional[Collector]) -> Optional[list[CovarianceGroup]]:
    """Every batch through one block (its outputs replace the cached inputs); with a `collector`, the covariance sums
    of its targets (not yet reduced over ranks)."""
    handles = []
    if collector is not None:
        collector.early_exit = False
        by_name = dict(block.named_modules())
        prefix = where + "."
        handles = [by_name[n[len(prefix):]].register_forward_pre_hook(collector.hook(n), with_kwargs=True)
                   for n in names]
    try:
        for b in range(len(inputs.hidden)):
            if collector is not None:
                collector.batch_index, collector.mask = b, masks[b]
                collector.no_padding = bool(masks[b].all())
            inputs.hidden[b] = run_block(block, inputs, b, where)
            if collector is not None and collector.first:
                after_first_forward(collector, names)
    finally:
        for h in handles:
            h.remove()
    return collector.groups if collector is not None else None


def _finish_block(groups: list[CovarianceGroup], modules: dict, config, settings: dict, factors: dict,
                  cache_dir: Optional[str], index: int, fingerprint: dict, write: bool) -> None:
    """Reduce the block's sums (if computed here), decompose its targets over the ranks, free its covariances."""
    rank, world = dist_info()
    costs = [sum(decomposition_cost(*target_shape(modules[n])) for n in g.members) for g in groups]
    owners = assign_owners(costs, world)
    if write:
        _reduce(groups, owners, to_all=cache_dir is not None)
        if cache_dir is not None and rank == 0:
            save_block_cache(cache_dir, index, groups, fingerprint)
    jobs = [_group_job(g, modules, config, settings) for g in groups]
    results = run_sharded(jobs, owners=owners, verbose=False)
    for g, out in zip(groups, results):
        for k, name in enumerate(g.members):
            r, scaling = rank_and_scaling(config, name, target_shape(modules[name]))
            factors[name] = (out[3 * k], out[3 * k + 1], r, scaling, out[3 * k + 2])
        g.positive_definite, g.condition_estimate = bool(out[-1][0]), float(out[-1][1])
        if g.condition_estimate < 0:
            g.condition_estimate = None
        g.covariance = g._sum = g._current = None
        g._chol.clear()


def _reduce(groups: list[CovarianceGroup], owners: list[int], to_all: bool) -> None:
    """Sums over the ranks, divided by the token counts, on each group's owner (or on every rank, `to_all`)."""
    rank, world = dist_info()
    for g, owner in zip(groups, owners):
        if world > 1:
            all_reduce_sum(g._sum) if to_all else reduce_sum_to_(g._sum, owner)
            g.tokens = int(all_reduce_sum(torch.tensor([float(g.tokens)], dtype=torch.float64)).item())
        if g.tokens == 0:
            raise ValueError("peft_ext.calibrate: the calibration data holds no real (unpadded) token. Fix: check the "
                             "data and its attention masks.")
        if to_all or owner == rank:
            g.covariance = symmetrize(g._sum).div_(g.tokens)
        g._sum = None


def _group_job(group: CovarianceGroup, modules: dict, config, settings: dict) -> Job:
    shapes = []
    for name in group.members:
        out_features, in_features = target_shape(modules[name])
        r, _ = rank_and_scaling(config, name, (out_features, in_features))
        shapes += [(r, in_features), (out_features, r), (r,)]
    device = modules[group.members[0]].weight.device
    return Job(name=group.members[0], cost=0.0, shapes=(*shapes, (2,)), device=device,
               compute=partial(_decompose_group, group, modules, config, settings), gather=contextlib.nullcontext)


def _decompose_group(group: CovarianceGroup, modules: dict, config, settings: dict) -> tuple[torch.Tensor, ...]:
    """On the group's owner: every member's (A0, B0, energy shares), then (C positive definite, condition estimate
    or -1)."""
    diagnose(group)
    out = []
    for name in group.members:
        module = modules[name]
        W, _ = decomposable_weight(module, isinstance(module, Conv1D), name=name, method="corda",
                                   float_weights_path=config.float_weights_path)
        r, scaling = rank_and_scaling(config, name, target_shape(module))
        out += decompose_member(group, W, r=r, scaling=scaling, settings=settings, name=name)
    cond = group.condition_estimate if group.condition_estimate is not None else -1.0
    return (*out, torch.tensor([float(bool(group.positive_definite)), cond], device=out[0].device))
