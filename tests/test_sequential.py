"""Block-by-block CorDA calibration (`calibrate(..., sequential=...)`): the same adapters as a whole-model pass, one
block's covariances alive at a time, a per-block cache that resumes an interrupted run, and clear refusals."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_ext.corda.sequential as sequential
from peft_ext import calibrate
from peft_ext.corda.covariance import CovarianceGroup

from .helpers import ARCHS, assert_same_state, corda, make_tiny, peft_ext_layers, state_snapshot, token_batches


def init_factors(model, config) -> dict:
    layers = peft_ext_layers(get_peft_model(model, config))
    return {n: (l.lora_init_A["default"].clone(), l.lora_init_B["default"].clone()) for n, l in layers.items()}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("method", ["kpm", "ipm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_equals_whole_model(arch, method):
    results = []
    for seq, where in ((False, None), (True, "cpu")):
        model, config = make_tiny(arch), corda(corda_method=method)
        calib = calibrate(model, config, token_batches(), covariance_dtype=torch.float64, sequential=seq,
                          hidden_states_device=where, verbose=False)
        assert bool(calib.factors) == seq
        results.append(init_factors(model, config))
    whole, seq = results
    assert whole.keys() == seq.keys() and len(whole) >= 8
    for name in whole:
        for a, b in zip(seq[name], whole[name]):
            assert rel(a, b) <= 1e-5, name


def test_default_is_block_by_block_and_frees_every_covariance():
    model, config = make_tiny("llama", layers=3), corda()
    calib = calibrate(model, config, token_batches(), verbose=False)
    assert calib.source == "sequential" and config.corda_calibration["sequential"] is True
    assert set(calib.factors) == set(calib.targets) and len(calib.targets) == 21
    assert all(g.covariance is None and g.dim > 0 for g in calib.groups)
    assert "input of" in calib.summary()


def test_one_block_of_covariances_alive_at_a_time():
    model, config = make_tiny("llama", layers=4), corda()
    alive = []

    def count(module, args):
        alive.append(sum(1 for o in gc.get_objects() if isinstance(o, CovarianceGroup)
                         and (o.covariance is not None or o._sum is not None)))

    handles = [block.self_attn.q_proj.register_forward_pre_hook(count) for block in model.model.layers]
    calibrate(model, config, token_batches(), verbose=False)
    for h in handles:
        h.remove()
    assert alive and max(alive) <= 4  # a llama block has 4 distinct inputs: q/k/v, o, gate/up, down


class Killed(Exception):
    pass


def test_an_interrupted_calibration_resumes_at_the_first_unfinished_block(tmp_path, monkeypatch):
    cache = str(tmp_path / "calibration")
    reference_model, reference = make_tiny("llama", layers=3), corda()
    calibrate(reference_model, reference, token_batches(), verbose=False)
    expected = init_factors(reference_model, reference)

    model = make_tiny("llama", layers=3)
    kill = model.model.layers[2].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        calibrate(model, corda(), token_batches(), cache_file=cache, verbose=False)
    kill.remove()
    assert sorted(os.listdir(cache)) == ["block-00000.safetensors", "block-00001.safetensors"]

    collectors = []
    real = sequential.Collector
    monkeypatch.setattr(sequential, "Collector", lambda *a: collectors.append(1) or real(*a))
    config = corda()
    calib = calibrate(model, config, token_batches(), cache_file=cache, verbose=False)
    assert calib.cached_blocks == (0, 1) and len(collectors) == 1  # only block 2 was calibrated
    for name, (A, B) in init_factors(model, config).items():
        assert rel(A, expected[name][0]) <= 1e-6 and rel(B, expected[name][1]) <= 1e-6, name


def test_a_block_cache_of_other_data_is_refused(tmp_path):
    cache = str(tmp_path / "calibration")
    model = make_tiny("llama")
    calibrate(model, corda(), token_batches(), cache_file=cache, verbose=False)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="block cache .* different data.*Fix"):
        calibrate(model, corda(), token_batches(seed=9), cache_file=cache, verbose=False)
    assert_same_state(before, model)


def test_a_whole_model_cache_file_is_read_as_it_is(tmp_path):
    cache = str(tmp_path / "cov.safetensors")
    model = make_tiny("llama")
    calibrate(model, corda(), token_batches(), cache_file=cache, sequential=False, verbose=False)
    config = corda()
    calib = calibrate(model, config, token_batches(), cache_file=cache, verbose=False)
    assert calib.source == cache and not calib.factors
    assert len(init_factors(model, config)) == 14


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c, "corda_method", "kpm"), r"corda_method 'ipm' -> 'kpm'"),
    (lambda c: setattr(c, "rank_pattern", {"q_proj": 2}), r"r \(this layer\) 4 -> 2"),
    (lambda c: setattr(c, "lora_alpha", 32), r"scaling"),
])
def test_a_config_changed_after_block_by_block_calibration_is_refused(change, message):
    model, config = make_tiny("llama"), corda(corda_method="ipm")
    calibrate(model, config, token_batches(), verbose=False)
    before = state_snapshot(model)
    change(config)
    with pytest.raises(ValueError, match=message + r".*Fix: call peft_ext.calibrate again"):
        get_peft_model(model, config)
    assert_same_state(before, model)
    assert not any(hasattr(m, "lora_A") for m in model.modules())


def test_targets_outside_the_blocks():
    model = make_tiny("llama")
    config = corda(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"sequential=True, but target layer 'lm_head' is outside.*Fix"):
        calibrate(model, config, token_batches(), sequential=True, verbose=False)
    calib = calibrate(model, config, token_batches(), verbose=False)  # None: whole-model
    assert not calib.factors and calib.group("lm_head").covariance is not None


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.proj(self.embed(input_ids))


def test_a_model_without_blocks():
    model = NoBlocks()
    config = corda(target_modules=["proj"])
    with pytest.raises(ValueError, match=r"sequential=True, but no decoder blocks.*Fix"):
        calibrate(model, config, token_batches(), sequential=True, verbose=False)
    assert calibrate(model, config, token_batches(), verbose=False).group("proj").covariance is not None


def test_a_block_returning_an_unexpected_structure_is_refused():
    model = make_tiny("llama")
    before = state_snapshot(model)
    block = model.model.layers[1]
    real = block.forward
    block.forward = lambda *a, **k: {"hidden": real(*a, **k)}
    with pytest.raises(ValueError, match=r"decoder block 'model.layers.1' returned dict.*Fix: sequential=False"):
        calibrate(model, corda(), token_batches(), verbose=False)
    del block.forward
    assert_same_state(before, model)
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hook left behind


def _tiny_other(arch: str):
    """Tiny random models of the other decoder families the block finder must handle."""
    from transformers import (GemmaConfig, GemmaForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig,
                              OPTForCausalLM, Phi3Config, Phi3ForCausalLM)

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    config, cls = {
        "gemma": (GemmaConfig(**common, intermediate_size=96, num_key_value_heads=2, head_dim=16), GemmaForCausalLM),
        "phi3": (Phi3Config(**common, intermediate_size=96, num_key_value_heads=2, pad_token_id=0), Phi3ForCausalLM),
        "opt": (OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                          word_embed_proj_dim=64, max_position_embeddings=128), OPTForCausalLM),
        "gpt_neox": (GPTNeoXConfig(**common, intermediate_size=96), GPTNeoXForCausalLM),
    }[arch]
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("arch", ["gemma", "phi3", "opt", "gpt_neox"])
def test_other_decoder_families_calibrate_block_by_block(arch):
    results = []
    for seq in (False, True):
        model, config = _tiny_other(arch), corda(corda_method="ipm", target_modules="all-linear")
        calib = calibrate(model, config, token_batches(), covariance_dtype=torch.float64, sequential=seq,
                          verbose=False)
        assert bool(calib.factors) == seq  # the blocks were found
        results.append(init_factors(model, config))
    whole, seq = results
    assert whole.keys() == seq.keys() and whole
    for name in whole:
        for a, b in zip(seq[name], whole[name]):
            assert rel(a, b) <= 1e-5, name
