"""Capacity planner for DuDe / CorDA init, from a model's config alone (no weights are loaded):

    python -m peft_ext.plan --model_config <config.json or model dir> --method corda|dude --samples 256 \\
        --max_length 1024 --world 8 [--dtype bf16] [--r 16] [--target_modules all-linear] \\
        [--rank_allocation budgeted --rank_cap 2]

prints, per rank: the extra peak memory of the calibration (block by block, whole-model, and peft's
`preprocess_corda`), the cached-activation size, the decomposition FLOPs (sharded over `--world` ranks, and on
one rank), and the adapter's factors: the trainable-parameter budget and the init factors held until every layer is
decomposed (with budgeted ranks each layer is decomposed at its cap, min(⌊rank_cap·r⌋, 256, min(out, in)), and
shrunk to its allocated rank at the first commit; block by block, the calibration holds them until get_peft_model).

How it knows the shapes and the distinct inputs: the model is built on the meta device (no memory) and its first
decoder block runs once on meta tensors with pre-hooks on its targets, as the calibration's collector does; layers that
receive the same tensor share one covariance. Every block is assumed to be like the first.

The memory model (bytes; c = 4 for float32 covariances, 8 for float64; a = 2 for bf16/fp16 activations, 4 for fp32):
* a covariance of a d-dimensional input: c·d²;
* whole-model: every distinct input's covariance, on every rank (all-reduced), until get_peft_model decomposes them;
* block by block: one block's covariances, plus this rank's cached hidden states, samples/world · max_length · hidden · a;
* peft's preprocess_corda: one float32 covariance per target module (no sharing of a common input), on every rank; and
  in host memory (it offloads them) the full U and V of every target's SVD(W·C) until it crops them;
* plus the decomposition's workspace for the largest layer (W and W·C in float32, the Gram matrix and its
  eigenvectors in float64, the Cholesky factor and the damped copy of C).
Decomposition FLOPs per layer: CorDA 2·out·in² (W·C) + 2·min²·max (Gram) + 9·min³ (eigh) + in³/3 (Cholesky, once
per distinct input); DuDe exact SVD 4·max·min² + 22·min³; randomized (niter power iterations, k = r + oversample)
4·(niter + 1)·out·in·k.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .corda.blocks import find_blocks
from .rank_budget import capped_rank
from .sharding import assign_owners
from .targets import target_module_names, target_shape

GB = 1e9


@dataclass
class Layer:
    name: str
    out_features: int
    in_features: int
    group: int  # index of its distinct input within the model
    block: int


@dataclass
class ModelShape:
    layers: list[Layer]
    group_dims: list[int]  # dimension of each distinct input
    group_blocks: list[int]
    hidden: int
    blocks: int
    name: str


def load_model_config(path: str):
    """A transformers config from a config.json file or a model directory."""
    from transformers import AutoConfig

    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"peft_ext.plan: --model_config {path!r} is neither a config.json file nor a model "
                                f"directory. Fix: the path of a model's config.json or of its folder.")
    with open(path) as f:
        data = json.load(f)
    if "model_type" not in data:
        raise ValueError(f"peft_ext.plan: {path!r} has no 'model_type'. Fix: a transformers config.json.")
    return AutoConfig.for_model(**data)


def model_shape(model_config, peft_config) -> ModelShape:
    """Target shapes and distinct inputs of the model described by `model_config`, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    names = target_module_names(model, peft_config)
    found = find_blocks(model)
    if found is None:
        raise ValueError(f"peft_ext.plan: no decoder blocks found in {type(model).__name__}.")
    path, blocks = found
    first_inputs = _first_block_inputs(blocks[0], model_config)
    modules = dict(model.named_modules())
    layers, groups, group_blocks = [], {}, []
    for name in names:
        if not name.startswith(f"{path}."):
            raise ValueError(f"peft_ext.plan: target '{name}' is outside the decoder blocks '{path}'.")
        index, inner = name[len(path) + 1:].split(".", 1)
        key = (int(index), first_inputs.get(inner, inner))
        if key not in groups:
            groups[key] = len(groups)
            group_blocks.append(int(index))
        layers.append(Layer(name, *target_shape(modules[name]), group=groups[key], block=int(index)))
    dims = [0] * len(groups)
    for layer in layers:
        dims[layer.group] = layer.in_features
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd")
    return ModelShape(layers, dims, group_blocks, hidden, len(blocks), type(model).__name__)


def _first_block_inputs(block: nn.Module, model_config) -> dict[str, int]:
    """Inner target name -> the id of the tensor it receives (equal ids: one shared input), from one forward of the
    block on meta tensors."""
    seen: dict[str, torch.Tensor] = {}  # the tensors themselves: held, their ids cannot be reused by later ones

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0])  # returns None: the input is left as it is
        return hook

    handles = [m.register_forward_pre_hook(record(n))
               for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd")
    kwargs = {}
    if "position_embeddings" in inspect.signature(block.forward).parameters:
        heads = getattr(model_config, "num_attention_heads", None) or model_config.n_head
        head_dim = getattr(model_config, "head_dim", None) or hidden // heads
        kwargs["position_embeddings"] = tuple(torch.zeros(1, 4, head_dim, device="meta") for _ in range(2))
    try:
        with torch.no_grad():
            block(torch.zeros(1, 4, hidden, device="meta"), **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: id(tensor) for name, tensor in seen.items()}


def corda_flops(layer: Layer, first_in_group: bool) -> float:
    o, i = layer.out_features, layer.in_features
    small, large = min(o, i), max(o, i)
    return 2.0 * o * i * i + 2.0 * small * small * large + 9.0 * small**3 + (i**3 / 3 if first_in_group else 0.0)


def dude_flops(layer: Layer, r: int, niter, oversample: int) -> float:
    o, i = layer.out_features, layer.in_features
    small, large = min(o, i), max(o, i)
    if niter is None:
        return 4.0 * large * small * small + 22.0 * small**3
    return 4.0 * (niter + 1) * o * i * min(r + oversample, small)


def peft_host_layer_bytes(layer: Layer) -> float:
    """What peft's preprocess_corda also holds per target at its peak (after `collect_eigens`, before
    `crop_corda_eigens`), offloaded to host memory: the full U (out × min) and V (in × min) of SVD(W·C), float32."""
    o, i = layer.out_features, layer.in_features
    return 4.0 * (o + i) * min(o, i)


def workspace_bytes(layer: Layer, method: str) -> float:
    o, i = layer.out_features, layer.in_features
    small = min(o, i)
    if method == "dude":
        return 4.0 * (2 * o * i + small * small + (o + i) * small)  # W, the SVD's U, S, Vᵀ and work copy
    return 4.0 * (2 * o * i + 2 * i * i) + 8.0 * 2 * small * small


def plan(shape: ModelShape, *, method: str, samples: int, max_length: int, world: int, act_bytes: int,
         cov_bytes: int = 4, r: int = 16, niter=None, oversample: int = 8, rank_cap: float | None = None) -> dict:
    """The planner's numbers (bytes and FLOPs) for one configuration; `rank_cap`: budgeted ranks with that cap
    (None: uniform r)."""
    ranks = [r if rank_cap is None else capped_rank(rank_cap, r, layer.out_features, layer.in_features)
             for layer in shape.layers]  # the rank each layer is decomposed at
    seen_groups: set = set()
    flops = []
    for layer, rank in zip(shape.layers, ranks):
        if method == "corda":
            flops.append(corda_flops(layer, layer.group not in seen_groups))
            seen_groups.add(layer.group)
        else:
            flops.append(dude_flops(layer, rank, niter, oversample))
    owners = assign_owners(flops, world)
    per_rank = [sum(f for f, o in zip(flops, owners) if o == k) for k in range(world)]
    workspace = max(workspace_bytes(layer, method) for layer in shape.layers)
    out = {"decomposition_flops_per_rank": max(per_rank), "decomposition_flops_one_rank": sum(flops),
           "workspace_bytes": workspace,
           "adapter_parameters": sum(r * (layer.in_features + layer.out_features) for layer in shape.layers),
           "init_factor_bytes": sum(4.0 * k * (layer.in_features + layer.out_features)
                                    for layer, k in zip(shape.layers, ranks))}
    if method == "corda":
        covs = [cov_bytes * d * d for d in shape.group_dims]
        per_block = [sum(c for c, b in zip(covs, shape.group_blocks) if b == k) for k in range(shape.blocks)]
        hidden = -(-samples // world) * max_length * shape.hidden * act_bytes
        out.update(
            covariance_bytes_whole_model=sum(covs),
            covariance_bytes_one_block=max(per_block),
            cached_hidden_bytes=hidden,
            peak_whole_model=sum(covs) + workspace,
            peak_sequential=max(per_block) + hidden + workspace,
            peak_peft_preprocess_corda=sum(4.0 * layer.in_features**2 for layer in shape.layers) + workspace,
            peft_host_bytes=sum(peft_host_layer_bytes(layer) for layer in shape.layers),
        )
    return out


def format_table(shape: ModelShape, numbers: dict, args) -> str:
    lines = [f"# peft_ext plan: {args.method} on {shape.name} ({shape.blocks} blocks, hidden {shape.hidden}, "
             f"{len(shape.layers)} target layers, {len(shape.group_dims)} distinct inputs), world {args.world}",
             "", "| quantity (per rank) | value |", "|---|---|"]
    if args.method == "corda":
        lines += [
            f"| calibration extra peak, block by block | {numbers['peak_sequential'] / GB:.2f} GB |",
            f"| calibration extra peak, whole-model | {numbers['peak_whole_model'] / GB:.2f} GB |",
            f"| calibration extra peak, peft's preprocess_corda | {numbers['peak_peft_preprocess_corda'] / GB:.2f} GB "
            f"+ {numbers['peft_host_bytes'] / GB:.2f} GB of U, V in host memory |",
            f"| covariances, one block / whole model | {numbers['covariance_bytes_one_block'] / GB:.2f} / "
            f"{numbers['covariance_bytes_whole_model'] / GB:.2f} GB |",
            f"| cached hidden states ({args.samples} samples × {args.max_length} tokens, {args.dtype}) | "
            f"{numbers['cached_hidden_bytes'] / GB:.2f} GB |",
        ]
    lines += [
        f"| decomposition workspace (largest layer) | {numbers['workspace_bytes'] / GB:.2f} GB |",
        f"| decomposition, sharded over {args.world} ranks | {numbers['decomposition_flops_per_rank'] / 1e12:.2f} "
        f"TFLOP |",
        f"| decomposition, one rank doing all | {numbers['decomposition_flops_one_rank'] / 1e12:.2f} TFLOP |",
        f"| adapter parameters (A and B"
        f"{', budget of the allocation, within 1%' if args.rank_allocation == 'budgeted' else ''}) | "
        f"{numbers['adapter_parameters'] / 1e6:.2f} M |",
        f"| init factors held until every layer is decomposed (float32"
        f"{f', each at its cap of rank_cap {args.rank_cap:g}' if args.rank_allocation == 'budgeted' else ''}) | "
        f"{numbers['init_factor_bytes'] / GB:.3f} GB |",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m peft_ext.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_config", required=True, help="a config.json file or a model directory")
    ap.add_argument("--method", choices=["corda", "dude"], required=True)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--world", type=int, default=1, help="ranks (processes) in all")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="activation dtype")
    ap.add_argument("--covariance_dtype", choices=["fp32", "fp64"], default="fp32")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--target_modules", default="all-linear")
    ap.add_argument("--svd_niter", type=int, default=None, help="DuDe: randomized SVD power iterations")
    ap.add_argument("--rank_allocation", choices=["uniform", "budgeted"], default="uniform")
    ap.add_argument("--rank_cap", type=float, default=2.0, help="budgeted: a layer's rank is at most rank_cap·r")
    args = ap.parse_args(argv)
    if args.rank_cap < 1:
        ap.error(f"--rank_cap must be >= 1 (got {args.rank_cap})")
    for flag in ("samples", "max_length", "world", "r"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    from .dude import DuDeConfig

    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    shape = model_shape(load_model_config(args.model_config), DuDeConfig(r=args.r, target_modules=targets))
    numbers = plan(shape, method=args.method, samples=args.samples, max_length=args.max_length, world=args.world,
                   act_bytes=4 if args.dtype == "fp32" else 2, cov_bytes=8 if args.covariance_dtype == "fp64" else 4,
                   r=args.r, niter=args.svd_niter,
                   rank_cap=args.rank_cap if args.rank_allocation == "budgeted" else None)
    print(format_table(shape, numbers, args))
    return numbers


if __name__ == "__main__":
    main()
