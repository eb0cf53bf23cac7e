"""Which modules a config adapts on a model: what get_peft_model will wrap, known before it runs (calibration,
progress totals)."""

from __future__ import annotations

import copy
import math

from torch import nn

from . import rank_budget
from ._compat import Conv1D, check_target_module_exists, get_pattern_key, maybe_include_all_linear_layers


def target_module_names(model: nn.Module, config) -> list[str]:
    """The modules get_peft_model will adapt with this config (nn.Linear / Conv1D only), in model order."""
    probe = maybe_include_all_linear_layers(copy.copy(config), model)  # it may rewrite target_modules: a copy
    return [
        name for name, module in model.named_modules()
        if name and isinstance(module, (nn.Linear, Conv1D)) and check_target_module_exists(probe, name)
    ]


def expect_targets(model: nn.Module, config) -> int:
    """Tell a DuDe/CorDA config how many layers the next get_peft_model on `model` will create, so that its init
    progress bar has a total (peft gives a config no such hook). Returns that number."""
    n = len(target_module_names(model, config))
    config.peft_ext_runtime.expected_layers = n
    return n


def rank_and_scaling(config, name: str, shape: tuple[int, int] | None = None) -> tuple[int, float]:
    """(r, scaling) that get_peft_model gives layer `name` (of (out, in) `shape`) when it decomposes it: rank_pattern /
    alpha_pattern as peft's LoraModel matches them, then alpha / r (alpha / sqrt(r) with use_rslora); for a budgeted
    config that has not allocated yet, the layer's provisional rank at the same scaling (`peft_ext.rank_budget`)."""
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    if shape is not None and rank_budget.pending(config):
        r = rank_budget.provisional_rank(config, r, *shape)
        alpha = rank_budget.alpha_for(config, r)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def target_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a target layer: nn.Linear (bitsandbytes layers too, whose weight holds packed storage) from its
    features, GPT-2's Conv1D from its (in, out) weight; the full shape of a ZeRO-3 partitioned weight."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    shape = getattr(module.weight, "ds_shape", module.weight.shape)
    return (shape[1], shape[0]) if isinstance(module, Conv1D) else (shape[0], shape[1])


def check_rank_fits(method: str, r: int, out_features: int, in_features: int, name: str) -> None:
    """A ValueError naming the layer and the fix when r exceeds what its decomposition can have."""
    if r > min(out_features, in_features):
        raise ValueError(
            f"peft_ext {method}: r={r} is larger than min(in_features={in_features}, out_features={out_features}) "
            f"of layer '{name}'. Fix: lower r, or give this layer a smaller rank with "
            f"rank_pattern={{'{name.rsplit('.', 1)[-1]}': {min(out_features, in_features)}}}."
        )
