"""Budgeted ranks (`rank_allocation="budgeted"`, peft_ext.rank_budget): the allocation rule on synthetic spectra, then
each guarantee over the tiny Llama / Qwen2 / Mistral / GPT-2 (Conv1D) models: budget and cap kept, outputs unchanged
at init, the allocation's objective met, save→load, export and merge identical, block by block equal to whole-model,
bad configs refused before any change. Multi-rank and ZeRO-3: tests/test_sharded_init.py, tests/test_distributed.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import get_peft_model

from peft_ext import CorDAConfig, DuDeConfig, calibrate, export_peft_adapter, load_adapter
from peft_ext.rank_budget import LayerSpectrum, allocate, budgeted_ranks

from .helpers import (ARCHS, assert_same_state, logits, make_tiny, peft_ext_layers, perturb_trainable, rel_err,
                      run_plain_peft, sample_input, state_snapshot, token_batches)

R = 8  # large enough that one component is a small part of the tiny models' budget


def config_for(method: str, **kwargs):
    kwargs = {"r": R, "lora_alpha": 16, "target_modules": "all-linear", "rank_allocation": "budgeted", **kwargs}
    if method == "dude":
        return DuDeConfig(**kwargs)
    return CorDAConfig(corda_method=method, **kwargs)


def budgeted_model(arch: str, method: str, sequential: bool = False, **kwargs):
    model, config = make_tiny(arch), config_for(method, **kwargs)
    if method != "dude":
        calibrate(model, config, token_batches(), sequential=sequential, verbose=False)
    return get_peft_model(model, config), config


def adapter_parameters(model) -> int:
    """Trainable or frozen factor parameters (A and B; a DoRA magnitude does not depend on the rank)."""
    return sum(layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel()
               for layer in peft_ext_layers(model).values())


# --- the rule ---------------------------------------------------------------------------------------------------------


def test_allocate_takes_the_best_share_per_parameter_within_budget_and_cap():
    layers = [LayerSpectrum("flat", [0.1] * 6, 10), LayerSpectrum("steep", [0.5, 0.3, 0.1, 0.05, 0.03, 0.02], 10),
              LayerSpectrum("costly", [0.6, 0.3, 0.05, 0.03, 0.01, 0.01], 30)]
    ranks = allocate(layers, budget=3 * 10 + 3 * 10 + 3 * 30, largest=True)  # uniform r=3
    assert sum(ranks[lay.name] * lay.cost for lay in layers) <= 150
    # per parameter: steep's 0.3 (0.03) and costly's 0.3 (0.01) ... flat's 0.1 (0.01); all six of flat fit the cap
    assert ranks == {"flat": 6, "steep": 3, "costly": 2}
    assert max(ranks.values()) <= 6 and min(ranks.values()) >= 1
    least = allocate(layers, budget=150, largest=False)  # shares given smallest first: the cheapest energy first
    assert sum(least[lay.name] * lay.cost for lay in layers) <= 150 and least["costly"] >= 1


def test_the_cap_keeps_an_export_servable_by_vllm():
    """A layer's rank is at most rank_cap·r, min(out, in) and 256, so that its export (rank 2·r_l) stays within vLLM's
    512; never below r (an r above 256 is the user's, and the export warns as for uniform r)."""
    from peft_ext.rank_budget import capped_rank

    assert capped_rank(2.0, 16, 4096, 4096) == 32 and capped_rank(3.5, 16, 4096, 4096) == 56
    assert capped_rank(2.0, 200, 4096, 4096) == 256 and 2 * capped_rank(8.0, 128, 8192, 8192) <= 512
    assert capped_rank(2.0, 16, 4096, 24) == 24 and capped_rank(2.0, 300, 4096, 4096) == 300
    assert capped_rank(2.0, 48, 4096, 32) == 48  # r does not fit: left for the layer's rank check to refuse


def test_uniform_is_kept_when_the_greedy_choice_does_worse():
    """Equal spectra and costs: nothing to gain; the summary says what uniform r captures and spends."""
    layers = [LayerSpectrum(n, [0.4, 0.3, 0.2, 0.1], 8) for n in "abc"]
    ranks, summary = budgeted_ranks(layers, 2, largest=True)
    assert ranks == {"a": 2, "b": 2, "c": 2} and summary["parameters"] == summary["budget_parameters"] == 48
    assert summary["energy_share_mean"] == pytest.approx(0.7) and not summary["fell_back_to_uniform"]


# --- on the tiny models -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dude", "ipm", "kpm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_budget_cap_outputs_and_objective(arch, method):
    x = sample_input()
    ref = logits(make_tiny(arch), x)
    model, config = budgeted_model(arch, method)
    assert rel_err(logits(model, x), ref) <= 1e-5  # unchanged at init
    summary, layers = config.rank_allocation_summary, peft_ext_layers(model)
    uniform = sum(R * (lay.in_features + lay.out_features) for lay in layers.values())
    spent = adapter_parameters(model)
    assert spent == summary["parameters"] and summary["budget_parameters"] == uniform
    assert abs(spent - uniform) <= 0.01 * uniform, (spent, uniform)  # the same budget within 1%
    ranks = {name: lay.r["default"] for name, lay in layers.items()}
    assert max(ranks.values()) <= 2 * R and min(ranks.values()) >= 1 and len(set(ranks.values())) > 1
    assert set(config.rank_pattern.values()) == set(ranks.values())
    for lay in layers.values():  # the scaling of uniform r on every layer
        assert lay.scaling["default"] == pytest.approx(16 / R)
    better = (summary["energy_share_mean"] >= summary["uniform_energy_share_mean"] if method != "kpm"
              else summary["energy_share_mean"] <= summary["uniform_energy_share_mean"])
    assert better, summary


def test_the_kept_components_are_the_uniform_init_s_own():
    """A layer kept at rank k holds the first k components of DuDe's SVD (IPM: largest) or the last k (KPM:
    smallest) of the provisional decomposition: the same factors a uniform rank-k init computes."""
    for method in ("dude", "kpm"):
        model, config = budgeted_model("llama", method)
        name, layer = next((n, lay) for n, lay in peft_ext_layers(model).items() if lay.r["default"] not in (R, 1))
        k = layer.r["default"]
        uniform_config = config_for(method, rank_allocation="uniform", r=k, lora_alpha=16 * k / R)
        uniform_model = make_tiny("llama")
        if method != "dude":
            calibrate(uniform_model, uniform_config, token_batches(), verbose=False)
        uniform_layer = peft_ext_layers(get_peft_model(uniform_model, uniform_config))[name]
        for key in ("lora_init_A", "lora_init_B"):
            torch.testing.assert_close(getattr(layer, key)["default"], getattr(uniform_layer, key)["default"],
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["dude", "kpm"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_export_merge(arch, method, tmp_path):
    x = sample_input()
    model, config = budgeted_model(arch, method)
    perturb_trainable(model)
    trained = logits(model, x)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["rank_allocation"] == "budgeted" and saved["rank_pattern"] == config.rank_pattern
    assert saved["rank_allocation_summary"]["parameters"] == adapter_parameters(model)
    reloaded = load_adapter(make_tiny(arch), str(tmp_path / "saved"), is_trainable=True)  # no calibration, no SVD
    assert rel_err(logits(reloaded, x), trained) <= 1e-5
    assert {n: lay.r["default"] for n, lay in peft_ext_layers(reloaded).items()} == \
        {n: lay.r["default"] for n, lay in peft_ext_layers(model).items()}
    if method == "kpm":  # A stays frozen in its shrunk modules, and after the reload
        assert not any(p.requires_grad for n, p in reloaded.named_parameters() if ".lora_A." in n)
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    out = export_peft_adapter(model, str(tmp_path / "export"))
    plain = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert max(plain["rank_pattern"].values()) <= 2 * 2 * R and "rank_allocation" not in plain
    assert rel_err(run_plain_peft(arch, out, x, tmp_path), trained) <= 1e-4
    assert rel_err(logits(model.merge_and_unload(), x), trained) <= 1e-5


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_block_by_block_allocates_as_whole_model(method):
    """The decision is global over all blocks: calibrated block by block, the same ranks and factors."""
    whole, whole_config = budgeted_model("mistral", method)
    blocks, blocks_config = budgeted_model("mistral", method, sequential=True)
    assert blocks_config.rank_pattern == whole_config.rank_pattern
    b = peft_ext_layers(blocks)
    for name, layer in peft_ext_layers(whole).items():
        torch.testing.assert_close(b[name].lora_init_B["default"], layer.lora_init_B["default"], rtol=1e-4, atol=1e-5)


def test_bad_configs_are_refused_before_any_change():
    with pytest.raises(ValueError, match="rank_allocation='even'. Fix: one of"):
        DuDeConfig(r=4, target_modules="all-linear", rank_allocation="even")
    with pytest.raises(ValueError, match="rank_cap=0.5. Fix: a number >= 1"):
        DuDeConfig(r=4, target_modules="all-linear", rank_allocation="budgeted", rank_cap=0.5)
    with pytest.raises(ValueError, match="rank_allocation='budgeted' with rank_pattern set"):
        CorDAConfig(r=4, target_modules="all-linear", rank_allocation="budgeted", rank_pattern={"q_proj": 2})
    model, x = make_tiny("llama"), sample_input()
    before, ref = state_snapshot(model), logits(model, x)
    config = config_for("kpm")  # no calibration: refused at the first layer, nothing allocated
    with pytest.raises(ValueError, match="no calibration"):
        get_peft_model(model, config)
    assert_same_state(before, model)
    assert torch.equal(logits(model, x), ref) and config.rank_allocation_summary is None and not config.rank_pattern
