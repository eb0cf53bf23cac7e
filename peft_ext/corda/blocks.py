"""A decoder model as a stack of blocks, for block-by-block calibration: find the blocks, capture what the model
passes to the first one, and run one block on those inputs.

    model(batch) ─▶ pre-hook on block 0 captures (hidden states, positional/mask arguments) and stops the forward
    block i: hidden states ─▶ block i ─▶ hidden states of block i + 1 (the other arguments are the same for every block)

GPTQ/AWQ-style tools work the same way. Found generically: the decoder stack is the `nn.ModuleList` of modules of one
class that holds the most parameters (`model.layers` in Llama, Qwen2, Mistral, Gemma, Phi-3; `transformer.h` in
GPT-2; `model.decoder.layers` in OPT; `gpt_neox.layers` in GPT-NeoX).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass
class Blocks:
    path: str  # e.g. "model.layers"
    modules: nn.ModuleList
    targets: list[list[str]]  # the target layer names inside each block, in model order


def find_blocks(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """(path, ModuleList) of the decoder blocks, or None."""
    best, best_size = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())  # ZeRO-3: the full size
        if size > best_size:
            best, best_size = (path, module), size
    return best


def blocks_for_targets(model: nn.Module, names: list[str], sequential: Optional[bool]) -> Optional[Blocks]:
    """The blocks and each one's targets when block-by-block calibration applies: every target inside a block.
    `sequential=None`: None where it does not apply; True: a ValueError saying why."""
    if sequential is False:
        return None
    found = find_blocks(model)
    if found is None:
        if sequential:
            raise ValueError(f"peft_ext.calibrate: sequential=True, but no decoder blocks (an nn.ModuleList of one "
                             f"block class) were found in this {type(model).__name__}. Fix: sequential=None or False "
                             f"(whole-model calibration).")
        return None
    path, modules = found
    prefixes = [f"{path}.{i}." for i in range(len(modules))]
    per_block: list[list[str]] = [[] for _ in modules]
    for name in names:
        index = next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)
        if index is None:
            if sequential:
                raise ValueError(f"peft_ext.calibrate: sequential=True, but target layer '{name}' is outside the "
                                 f"decoder blocks '{path}'. Fix: leave it out of target_modules, or sequential=None/"
                                 f"False (whole-model calibration).")
            return None
        per_block[index].append(name)
    return Blocks(path, modules, per_block)


class _Captured(Exception):
    """Raised by the pre-hook on the first block: the rest of the model is not needed."""


@dataclass
class BlockInputs:
    """What the model passed to its first block, per batch; `hidden` is replaced by each block's output in turn."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)  # positional arguments after the hidden states
    kwargs: list[dict] = field(default_factory=list)
    device: Optional[torch.device] = None  # where the blocks run


def capture_first_block_inputs(model: nn.Module, first: nn.Module, batches: list[dict], device: torch.device,
                               hidden_device: Optional[torch.device], extra: dict) -> BlockInputs:
    """Run each batch up to the first block and keep its inputs (hidden states on `hidden_device`, default where
    the model runs; in the activation dtype)."""
    inputs = BlockInputs(device=device)

    def pre_hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        inputs.hidden.append(hidden.detach().to(hidden_device or hidden.device))
        inputs.args.append(rest)
        inputs.kwargs.append(dict(kwargs))
        raise _Captured

    # prepended: runs before any other pre-hook (e.g. a ZeRO-3 gather, which would be left open by the raise)
    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      **extra)
            except _Captured:
                continue
            raise RuntimeError(f"peft_ext.calibrate: the forward pass of this {type(model).__name__} never reached "
                               f"its first decoder block. Fix: sequential=False (whole-model calibration).")
    finally:
        handle.remove()
    return inputs


def run_block(block: nn.Module, inputs: BlockInputs, i: int, where: str) -> torch.Tensor:
    """Block `block` on batch `i`'s cached inputs; its output hidden states (same shape as its input)."""
    hidden = inputs.hidden[i]
    out = block(hidden.to(inputs.device), *inputs.args[i], **inputs.kwargs[i])
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if not torch.is_tensor(first) or first.shape != hidden.shape:
        got = type(out).__name__ if not torch.is_tensor(first) else f"a tensor of shape {tuple(first.shape)}"
        raise ValueError(f"peft_ext.calibrate: decoder block '{where}' returned {got}, not hidden states of shape "
                         f"{tuple(hidden.shape)} (alone or first in a tuple). Fix: sequential=False (whole-model "
                         f"calibration) for this model.")
    return first.detach().to(hidden.device)
