"""Loading saved state into an adapter that exists already (peft's load_adapter, set_peft_model_state_dict,
load_state_dict, a Trainer resume) rebuilds the residual from the original weight and the loaded init factors, and an
adapter is refused by another base model than its own."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights

from tests.helpers import (ARCHS, FAST, assert_same_state, corda, logits, make_tiny, perturb_trainable, rel_err, run_cli,
                           sample_input, state_snapshot, token_batches, SMOL)


def config_for(method, arch, variant):
    """A config whose init depends on `variant`: the randomized SVD's seed (DuDe), the calibration data (CorDA)."""
    from peft_ext import DuDeConfig, calibrate

    model = make_tiny(arch)
    if method == "dude":
        config = DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear", svd_niter=1, svd_seed=variant)
    else:
        config = corda(corda_method="ipm")
        calibrate(model, config, token_batches(seed=3 + variant), verbose=False)
    return model, config


def trained_adapter(method, arch, tmp_path):
    model, config = config_for(method, arch, 0)
    pm = get_peft_model(model, config)
    perturb_trainable(pm, scale=0.5)
    x = sample_input()
    pm.save_pretrained(tmp_path / "adapter")
    torch.save({k: v for k, v in pm.state_dict().items() if "lora_" in k}, tmp_path / "state.pt")
    return logits(pm, x), x


LOADERS = {
    "peft load_adapter": lambda pm, path: pm.load_adapter(path, "default"),
    "set_peft_model_state_dict": lambda pm, path: set_peft_model_state_dict(pm, load_peft_weights(path)),
    # the module's own state dict (what a whole-model checkpoint holds), saved beside the adapter
    "load_state_dict": lambda pm, path: pm.load_state_dict(torch.load(os.path.join(path, "..", "state.pt")),
                                                           strict=False),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("method", ["dude", "corda"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loading_into_a_differently_initialised_adapter_is_exact(arch, method, loader, tmp_path):
    want, x = trained_adapter(method, arch, tmp_path)
    model, config = config_for(method, arch, 1)  # another init: the fresh residual differs from the saved one's
    fresh = get_peft_model(model, config)
    assert rel_err(logits(fresh, x), want) > 1e-2
    LOADERS[loader](fresh, str(tmp_path / "adapter"))
    assert rel_err(logits(fresh, x), want) < 1e-5
    with fresh.disable_adapter():  # and the original weight is still what the residual is relative to
        assert rel_err(logits(fresh, x), logits(make_tiny(arch), x)) < 1e-5


@pytest.mark.parametrize("method", ["dude", "corda"])
def test_another_base_model_is_refused_and_left_untouched(method, tmp_path):
    import peft_ext

    want, x = trained_adapter(method, "qwen2", tmp_path)
    path = str(tmp_path / "adapter")
    other = make_tiny("qwen2", seed=5)  # the same shapes, other weights
    before = state_snapshot(other)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' .*check_base=False"):
        peft_ext.load_adapter(other, path)
    assert_same_state(before, other)
    assert not any(hasattr(m, "lora_A") for m in other.modules())
    # a deliberate transfer: the saved adapter on the other base
    moved = peft_ext.load_adapter(other, path, check_base=False)
    assert rel_err(logits(moved, x), want) > 1e-2
    # and the exact base loads as before
    assert rel_err(logits(peft_ext.load_adapter(make_tiny("qwen2"), path), x), want) < 1e-5


def test_a_state_dict_of_another_base_is_refused(tmp_path):
    trained_adapter("dude", "llama", tmp_path)
    model, config = config_for("dude", "llama", 0)
    pm = get_peft_model(make_tiny("llama", seed=5), config)
    x = sample_input()
    with pytest.raises(ValueError, match="fingerprints differ"):
        pm.load_adapter(str(tmp_path / "adapter"), "default")
    # the layer that refused kept its init factors and residual (the layers before it loaded their state normally)
    with pm.disable_adapter():
        assert rel_err(logits(pm, x), logits(make_tiny("llama", seed=5), x)) < 1e-5


def test_fingerprints_are_saved_and_dropped_by_the_export(tmp_path):
    import peft_ext

    trained_adapter("dude", "gpt2", tmp_path)
    saved = load_peft_weights(str(tmp_path / "adapter"))
    prints = [k for k in saved if k.endswith(".lora_init_fingerprint")]
    assert len(prints) == sum(k.endswith(".lora_init_A") for k in saved) > 0
    assert all(saved[k].dtype == torch.float32 and saved[k].shape == (16,) for k in prints)
    out = peft_ext.export_peft_adapter(str(tmp_path / "adapter"), str(tmp_path / "plain"))
    assert not any("lora_init" in k for k in load_peft_weights(out))


@pytest.mark.parametrize("method,variant_flags", [
    ("dude", [["--svd_niter", "1", "--svd_seed", "0"], ["--svd_niter", "1", "--svd_seed", "7"]]),
    ("corda_ipm", [["--calibration_samples", "8"], ["--calibration_samples", "6"]]),
])
def test_resumed_sft_run_equals_an_uninterrupted_one(method, variant_flags, tiny_model_dir, tmp_path):
    """trl_recipes.sft --resume_from_checkpoint in a process whose fresh init differs from the checkpoint's."""
    recipe = {"dude": "dude/config_cpu.yaml", "corda_ipm": "corda/config_ipm_cpu.yaml"}[method]
    common = ["--config", os.path.join(SMOL, recipe), "--model_name_or_path", tiny_model_dir, *FAST,
              "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_examples", "0",
              "--learning_rate", "1e-2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = run_cli(*common, *variant_flags[0], "--output_dir", str(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(*common, *variant_flags[1], "--output_dir", str(resumed),
                   "--resume_from_checkpoint", str(full / "checkpoint-2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.load(open(d / "metrics.json"))["loss_history"] for d in (full, resumed))
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's trainer state
    assert [l for _, l in b] == pytest.approx([l for _, l in a], rel=1e-4)
    wa, wb = (load_peft_weights(str(d / "adapter")) for d in (full, resumed))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["dude", "corda"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_low_cpu_mem_usage_creates_and_loads_real_adapters(arch, method, tmp_path):
    """peft creates the adapter on the meta device under low_cpu_mem_usage; the init factors are put in place."""
    import peft_ext

    want, x = trained_adapter(method, arch, tmp_path)
    model, config = config_for(method, arch, 0)
    reference = logits(get_peft_model(make_tiny(arch), config_for(method, arch, 0)[1]), x)
    fresh = get_peft_model(model, config, low_cpu_mem_usage=True)
    assert not [n for n, p in fresh.named_parameters() if p.is_meta]
    assert torch.equal(logits(fresh, x), reference)
    loaded = peft_ext.load_adapter(make_tiny(arch), str(tmp_path / "adapter"), low_cpu_mem_usage=True)
    assert not [n for n, p in loaded.named_parameters() if p.is_meta]
    assert rel_err(logits(loaded, x), want) < 1e-6
