"""A refused or failed injection leaves every adapter that existed before it bit-identical."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_ext import CorDAConfig, DuDeConfig, calibrate
from peft_ext.corda.calibration import batch_rows

from .helpers import VOCAB, assert_same_state, logits, make_tiny, perturb_trainable, rel_err, sample_input, state_snapshot


def _config(method: str):
    common = dict(r=4, lora_alpha=8, target_modules="all-linear")
    return DuDeConfig(**common) if method == "dude" else CorDAConfig(corda_method="ipm", **common)


def _ready(model, method: str):
    """A config for `model`, calibrated first where the method needs it."""
    config = _config(method)
    if method == "corda":
        g = torch.Generator().manual_seed(3)
        rows = [torch.randint(1, VOCAB, (16,), generator=g).tolist() for _ in range(8)]
        calibrate(model, config, batch_rows(rows, 4, 0), verbose=False)
    return config


@pytest.mark.parametrize("form", ["base model", "peft model"])
@pytest.mark.parametrize("method", ["dude", "corda"])
def test_second_injection_refused_without_touching_the_first(method, form):
    """get_peft_model(m, cfg) or get_peft_model(pm, cfg) on a model that already holds a trained residual-init
    adapter is refused, and the existing adapter (factors, init buffers, magnitude, residual weights) and the outputs
    stay exactly as they were."""
    x = sample_input()
    base = make_tiny("llama")
    first = _ready(base, method)
    pm = get_peft_model(base, first)
    perturb_trainable(pm)
    before, out_before = state_snapshot(pm), logits(pm, x)
    target = base if form == "base model" else pm
    second = _config(method) if method == "dude" else _ready(make_tiny("llama"), method)
    with pytest.raises(ValueError, match="already holds the residual-init adapter 'default'"):
        get_peft_model(target, second)
    assert_same_state(before, pm)
    # (peft itself, for every tuner, stores the new config under the adapter name before it injects and does not
    # put the old one back when the injection fails: pm.peft_config["default"] is `second` now; not ours to undo)
    assert rel_err(logits(pm, x), out_before) == 0.0


def _registration_hooks() -> int:
    from torch.nn.modules import module

    return len(module._global_module_registration_hooks)


def test_rollback_puts_the_same_modules_back_and_leaves_no_hook():
    """r=48 fails at k_proj after q_proj was wrapped: every wrapper created is replaced by the very module it wrapped,
    and the injection's module-registration hook is gone, after a failure as after a success."""
    model = make_tiny("llama")
    modules = dict(model.named_modules())
    hooks = _registration_hooks()
    with pytest.raises(ValueError, match="r=48"):
        get_peft_model(model, DuDeConfig(r=48, lora_alpha=48, target_modules="all-linear"))
    assert all(dict(model.named_modules())[name] is m for name, m in modules.items())
    assert len(dict(model.named_modules())) == len(modules)
    assert _registration_hooks() == hooks
    get_peft_model(model, DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert _registration_hooks() == hooks
