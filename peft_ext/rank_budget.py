"""Budgeted ranks (`rank_allocation="budgeted"`): per-layer ranks from the spectra the init computes anyway, under the
trainable-parameter budget of uniform r.

    every target created at its provisional rank (cap_l = min(⌊rank_cap·r⌋, 256 or r, min(out, in))), its factors
    and the energy share of each of its components computed as usual (sharded, block by block, ZeRO-3 alike)
        ─▶ at the injection's first commit, before any residual is written: `allocate` over all targets at once
        ─▶ each layer keeps its best r_l components (`ResidualInitMixin.keep_components`); the config records
           rank_pattern, alpha_pattern (the scaling stays lora_alpha / r) and `rank_allocation_summary`

What "best" means follows the method's purpose, on each layer's energy shares (a component's σ² over the sum of all
σ² of that layer's decomposed matrix, W for DuDe, W·C for CorDA, so layers of different scales compare):
* DuDe and CorDA-IPM train their largest components: capture the most energy per trainable parameter;
* CorDA-KPM trains its smallest: leave the least context energy in the trained subspace per parameter.

A component of layer l costs in_l + out_l parameters (a DoRA magnitude does not depend on the rank). Every layer keeps
at least one. Components are taken greedily by energy share per parameter, best first, while they fit the budget;
the budget is what uniform r costs, and what is left unspent is less than one component of the cheapest layer that
could still grow. Should the greedy choice do worse than uniform r on its own objective, uniform r is kept.

The cap of 256 keeps an exported adapter (rank 2·r_l, see `peft_ext.export`) within vLLM's 512 (where r ≤ 256).
The saved rank_pattern makes a reload, an export and a merge plain peft: nothing is allocated again.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

RANK_ALLOCATIONS = ("uniform", "budgeted")
SERVABLE_RANK = 256  # an export doubles the rank; vLLM serves LoRA up to rank 512


def pending(config) -> bool:
    """Whether this config's next injection allocates ranks (budgeted, and no allocation recorded yet)."""
    return getattr(config, "rank_allocation", "uniform") == "budgeted" and config.rank_allocation_summary is None


def provisional_rank(config, r: int, out_features: int, in_features: int) -> int:
    """The rank a target is created with before the allocation: the most it may end with."""
    return capped_rank(config.rank_cap, r, out_features, in_features)


def capped_rank(rank_cap: float, r: int, out_features: int, in_features: int) -> int:
    """min(⌊rank_cap·r⌋, 256 (or r, if larger), min(out, in)), never below r (the planner uses it too)."""
    if r > min(out_features, in_features):
        return r  # as uniform r: refused by the layer's rank check, with its fix
    return max(min(math.floor(rank_cap * r), max(r, SERVABLE_RANK), out_features, in_features), r)


def alpha_for(config, r_layer: int) -> float:
    """The lora_alpha that gives a layer of rank `r_layer` the scaling of uniform r (alpha / r, or alpha / √r)."""
    ratio = r_layer / config.r
    return config.lora_alpha * (math.sqrt(ratio) if config.use_rslora else ratio)


@dataclass
class LayerSpectrum:
    """One target: its name, the energy shares of its provisional components in the order it would keep them (best
    first), and the parameters one component costs."""

    name: str
    shares: list[float]
    cost: int


def _objective(layers: list[LayerSpectrum], ranks: dict[str, int]) -> float:
    return sum(sum(layer.shares[:ranks[layer.name]]) for layer in layers)


def allocate(layers: list[LayerSpectrum], budget: int, *, largest: bool) -> dict[str, int]:
    """Ranks per layer within `budget` parameters: greedy by share per parameter (largest: most first; else least
    first), at least 1 and at most len(shares) each; uniform (`budget`'s r, capped) when that is better."""
    ranks = {layer.name: 1 for layer in layers}
    spent = sum(layer.cost for layer in layers)
    sign = -1.0 if largest else 1.0
    heap = [(sign * layer.shares[1] / layer.cost, i) for i, layer in enumerate(layers) if len(layer.shares) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        layer = layers[i]
        if spent + layer.cost > budget:
            continue  # this layer's next component does not fit; a cheaper layer's may
        ranks[layer.name] += 1
        spent += layer.cost
        k = ranks[layer.name]
        if k < len(layer.shares):
            heapq.heappush(heap, (sign * layer.shares[k] / layer.cost, i))
    return ranks


def budgeted_ranks(layers: list[LayerSpectrum], r: int, *, largest: bool) -> tuple[dict[str, int], dict]:
    """`allocate` under uniform r's budget, with a summary of what it spent and captured against uniform r."""
    uniform = {layer.name: min(r, len(layer.shares)) for layer in layers}
    budget = sum(r * layer.cost for layer in layers)
    ranks = allocate(layers, budget, largest=largest)
    mine, theirs = _objective(layers, ranks), _objective(layers, uniform)
    fell_back = (mine < theirs) if largest else (mine > theirs)
    if fell_back:
        ranks = uniform
        mine = theirs
    values = sorted(ranks.values())
    summary = {
        "budget_parameters": budget,
        "parameters": sum(ranks[layer.name] * layer.cost for layer in layers),
        "objective": "most energy" if largest else "least context energy",
        "energy_share_mean": mine / len(layers), "uniform_energy_share_mean": theirs / len(layers),
        "fell_back_to_uniform": fell_back,
        "rank_min": values[0], "rank_median": values[len(values) // 2], "rank_max": values[-1],
    }
    return ranks, summary


def allocate_injection(runtime, config) -> None:
    """At the first commit of a budgeted injection: allocate over every layer it created, shrink each to its rank,
    record the result in `config`. Every rank of a process group computes the same (the spectra were broadcast)."""
    entries = [(layer, adapter, layer.residual_init_states()[adapter])
               for layer, adapter, _ in runtime.injection.entries]
    largest = config.keeps_largest_components()
    layers = []
    for _, _, state in entries:
        shares = state.spectrum.double()
        shares = shares if largest else shares.flip(0)  # KPM's factors run from larger to smaller: smallest first
        layers.append(LayerSpectrum(state.name, shares.tolist(), state.lora_A.shape[1] + state.lora_B.shape[0]))
    ranks, summary = budgeted_ranks(layers, config.r, largest=largest)
    summary["rank_cap"] = config.rank_cap
    for layer, adapter, state in entries:
        rank = ranks[state.name]
        layer.keep_components(adapter, rank, last=not largest, lora_alpha=alpha_for(config, rank))
    config.rank_pattern = {state.name: ranks[state.name] for _, _, state in entries}
    config.alpha_pattern = {state.name: alpha_for(config, ranks[state.name]) for _, _, state in entries}
    config.rank_allocation_summary = summary


def energy_shares(S: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Each component's σ² over the total energy of its matrix (float32)."""
    return (S.double().square() / total.double().clamp_min(torch.finfo(torch.float64).tiny)).float()
