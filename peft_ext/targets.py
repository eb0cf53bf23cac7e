"""Which modules a config adapts on a model: what get_peft_model will wrap, known before it runs (calibration,
progress totals)."""

from __future__ import annotations

import copy

from torch import nn

from ._compat import Conv1D, check_target_module_exists, maybe_include_all_linear_layers


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
