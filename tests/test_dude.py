"""DuDe: each guarantee a test, over the tiny Llama / Qwen2 / Mistral / GPT-2 (Conv1D) models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import transpose

import peft_ext
from peft_ext import DuDeConfig, export_peft_adapter, load_adapter, load_config
from peft_ext.layer import PEFT_EXT_INIT

from .helpers import (ARCHS, assert_same_state, logits, make_tiny, peft_ext_layers, perturb_trainable, rel_err,
                      run_plain_peft, sample_input, state_snapshot)


def dude(**kwargs) -> DuDeConfig:
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    kwargs.setdefault("target_modules", "all-linear")
    return DuDeConfig(**kwargs)


def trained_dude(arch, dtype=torch.float32, **kwargs):
    model = get_peft_model(make_tiny(arch, dtype=dtype), dude(**kwargs))
    perturb_trainable(model)
    return model


# --- init -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_init_preserves_logits(arch):
    x = sample_input()
    ref = logits(make_tiny(arch), x)
    model = get_peft_model(make_tiny(arch), dude())
    assert len(peft_ext_layers(model)) > 0
    assert rel_err(logits(model, x), ref) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_factors_are_the_top_r_svd(arch):
    """B·A·s is the top-r SVD part of W (float64 reference), the base weight is the residual, m = row norms of W."""
    original = make_tiny(arch)
    weights = {n: transpose(m.weight.detach().double(), arch == "gpt2") for n, m in original.named_modules()
               if hasattr(m, "weight") and m.weight is not None and m.weight.ndim == 2}
    config = dude(r=4, lora_alpha=12)
    model = get_peft_model(make_tiny(arch), config)
    scaling = 12 / 4
    for name, layer in peft_ext_layers(model).items():
        W = weights[name.removeprefix("base_model.model.")]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        BA = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        torch.testing.assert_close(scaling * BA, top, atol=1e-5, rtol=0)
        residual = transpose(layer.get_base_layer().weight.double(), layer.fan_in_fan_out)
        torch.testing.assert_close(residual, W - top, atol=1e-5, rtol=0)
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.dtype == torch.float32
        torch.testing.assert_close(magnitude.double(), torch.linalg.vector_norm(W, dim=1), atol=1e-5, rtol=1e-6)
        # B = U_r·sqrt(S_r/s), A = sqrt(S_r/s)·V_rᵀ: B's columns are orthogonal, A's rows are orthogonal
        B = layer.lora_B["default"].weight.double()
        gram = B.T @ B
        torch.testing.assert_close(gram, torch.diag(torch.diag(gram)), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.diag(gram), S[:4] / scaling, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bases(dtype):
    """Decomposition runs in float32 and is cast back: the base keeps its dtype, the magnitude stays float32, and the
    outputs stay as close to the base model's as the dtype allows."""
    x = sample_input()
    ref = logits(make_tiny("llama", dtype=dtype), x)
    model = get_peft_model(make_tiny("llama", dtype=dtype), dude())
    for layer in peft_ext_layers(model).values():
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
        assert layer.lora_init_A["default"].dtype == torch.float32
    out = logits(model, x)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def test_randomized_svd_is_seeded_and_close_to_exact():
    x = sample_input()
    runs = [get_peft_model(make_tiny("llama"), dude(svd_niter=4)) for _ in range(2)]
    other_seed = get_peft_model(make_tiny("llama"), dude(svd_niter=4, svd_seed=7))
    a, b = (peft_ext_layers(m) for m in runs)
    for name in a:
        assert torch.equal(a[name].lora_A["default"].weight, b[name].lora_A["default"].weight)
        assert torch.equal(a[name].lora_B["default"].weight, b[name].lora_B["default"].weight)
        assert torch.equal(a[name].get_base_layer().weight, b[name].get_base_layer().weight)
    # a different seed gives (slightly) different factors, but the same outputs at init
    c = peft_ext_layers(other_seed)
    assert any(not torch.equal(a[n].lora_A["default"].weight, c[n].lora_A["default"].weight) for n in a)
    ref = logits(make_tiny("llama"), x)
    assert rel_err(logits(runs[0], x), ref) <= 1e-5


def test_randomized_svd_matches_exact_on_a_decaying_spectrum():
    """Real weights have decaying spectra (random tiny models do not): there a few power iterations recover the
    exact top-r factors."""
    from peft_ext.linalg import top_r_svd

    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(96, 64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    W = Q1 @ torch.diag(torch.logspace(0, -3, 64)) @ Q2.T
    U, S, Vh = top_r_svd(W, 8)
    Ur, Sr, Vhr = top_r_svd(W, 8, niter=4)
    torch.testing.assert_close(Sr, S, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Ur @ torch.diag(Sr) @ Vhr, U @ torch.diag(S) @ Vh, rtol=0, atol=1e-5)
    # canonical signs: the same singular vectors, not just the same subspace
    torch.testing.assert_close(Ur, U, rtol=0, atol=1e-3)


def test_global_rng_untouched_by_randomized_svd():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_peft_model(make_tiny("llama"), dude(svd_niter=2))
    # make_tiny reseeds; reseed identically and compare what the global RNG yields after our init
    torch.manual_seed(123)
    state = torch.get_rng_state()
    from peft_ext.linalg import randomized_svd

    randomized_svd(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)), 2, niter=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)


# --- training -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_reach_factors_and_magnitude(arch):
    model = get_peft_model(make_tiny(arch), dude(lora_dropout=0.1))
    model.train()
    x = sample_input()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable)
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("base_layer" in n for n in frozen)


def test_zero_weight_row_gives_no_nan():
    """peft's DoRA divides by the row norm (NaN for an all-zero row, peft issue 2049); DuDe does not."""
    base = make_tiny("llama")
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[3].zero_()
        base.model.layers[0].mlp.down_proj.weight[:2].zero_()
    x = sample_input()
    ref = logits(base, x)
    model = get_peft_model(base, dude())
    out = logits(model, x)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-5
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), n
    perturb_trainable(model)
    trained = logits(model, x)
    merged = logits(model.merge_and_unload(), x)
    assert torch.isfinite(merged).all() and rel_err(merged, trained) <= 1e-5


def test_factored_row_norm_matches_dense():
    from peft_ext.linalg import dora_row_norm

    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(48, 80, generator=g), torch.randn(6, 80, generator=g), torch.randn(48, 6, generator=g)
    dense = torch.linalg.vector_norm(W.double() + 0.7 * B.double() @ A.double(), dim=1)
    torch.testing.assert_close(dora_row_norm(W, A, B, 0.7).double(), dense, rtol=1e-5, atol=1e-5)


# --- save / load ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_identical(arch, tmp_path, monkeypatch):
    x = sample_input()
    model = trained_dude(arch, svd_niter=2)
    trained = logits(model, x)
    model.save_pretrained(tmp_path)

    # the reload must not decompose anything: it rebuilds the residual from the saved factors
    from peft_ext.dude import config as dude_config

    def no_svd(*args, **kwargs):
        raise AssertionError("load_adapter ran an SVD")

    monkeypatch.setattr(dude_config, "top_r_svd", no_svd)
    reloaded = load_adapter(make_tiny(arch), str(tmp_path))
    assert isinstance(reloaded, PeftModel)
    assert rel_err(logits(reloaded, x), trained) <= 1e-5
    for name, layer in peft_ext_layers(reloaded).items():
        original = peft_ext_layers(model)[name]
        assert torch.equal(layer.get_base_layer().weight, original.get_base_layer().weight), name
    # inference by default; trainable on request
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = load_adapter(make_tiny(arch), str(tmp_path), is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_magnitude_vector" in n)


def test_bf16_reload_rebuilds_the_residual_bit_for_bit(tmp_path):
    model = trained_dude("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    reloaded = load_adapter(make_tiny("llama", dtype=torch.bfloat16), str(tmp_path))
    layers = peft_ext_layers(model)
    for name, layer in peft_ext_layers(reloaded).items():
        assert torch.equal(layer.get_base_layer().weight, layers[name].get_base_layer().weight), name
        assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
        assert torch.equal(layer.lora_magnitude_vector["default"].weight,
                           layers[name].lora_magnitude_vector["default"].weight)
    x = sample_input()
    assert torch.equal(logits(reloaded, x), logits(model, x))


def test_saved_config_keeps_every_dude_field(tmp_path):
    config = dude(r=6, lora_alpha=3, svd_niter=3, svd_oversample=5, svd_seed=11, use_rslora=True,
                  rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 7})
    model = get_peft_model(make_tiny("llama"), config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_ext_method"] == "dude" and saved["init_lora_weights"] == PEFT_EXT_INIT
    loaded = load_config(str(tmp_path))
    assert type(loaded) is DuDeConfig
    for key in ("r", "lora_alpha", "svd_niter", "svd_oversample", "svd_seed", "use_rslora", "rank_pattern",
                "alpha_pattern", "use_dora", "peft_ext_method"):
        assert getattr(loaded, key) == getattr(config, key), key
    # loading through the class peft users know picks our class too
    assert type(DuDeConfig.from_pretrained(str(tmp_path))) is DuDeConfig


def test_plain_peft_refuses_a_dude_directory(tmp_path):
    """Loading with plain peft must fail loudly instead of silently giving a plain LoRA over the wrong weights."""
    trained_dude("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="peft_ext"):
        PeftModel.from_pretrained(make_tiny("llama"), str(tmp_path))


# --- export ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_without_peft_ext(arch, tmp_path):
    x = sample_input()
    model = trained_dude(arch)
    trained = logits(model, x)
    out_dir = export_peft_adapter(model, str(tmp_path / "export"))
    plain = json.loads(open(os.path.join(out_dir, "adapter_config.json")).read())
    assert plain["r"] == 8 and plain["lora_alpha"] == 16 and plain["use_dora"] is True
    assert plain["init_lora_weights"] is True and "peft_ext_method" not in plain
    assert rel_err(run_plain_peft(arch, out_dir, x, tmp_path), trained) <= 1e-4


def test_export_with_rank_alpha_patterns_and_rslora(tmp_path):
    x = sample_input()
    model = trained_dude("qwen2", use_rslora=True, rank_pattern={"q_proj": 2, "down_proj": 6},
                         alpha_pattern={"v_proj": 3, "q_proj": 5})
    trained = logits(model, x)
    out_dir = export_peft_adapter(model, str(tmp_path / "export"))
    assert rel_err(run_plain_peft("qwen2", out_dir, x, tmp_path), trained) <= 1e-4
    assert rel_err(run_plain_peft("qwen2", out_dir, x, tmp_path, merge=True), trained) <= 1e-4


def test_export_of_a_reloaded_adapter_and_of_a_saved_directory(tmp_path):
    x = sample_input()
    model = trained_dude("mistral")
    trained = logits(model, x)
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_adapter(make_tiny("mistral"), str(tmp_path / "saved"))
    out_dir = export_peft_adapter(reloaded, str(tmp_path / "export"))
    assert rel_err(run_plain_peft("mistral", out_dir, x, tmp_path), trained) <= 1e-4
    from_dir = export_peft_adapter(str(tmp_path / "saved"), str(tmp_path / "export_dir"))
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (out_dir, from_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_plain_lora_and_merged(tmp_path):
    lora = get_peft_model(make_tiny("llama"), LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="not a DuDe/CorDA adapter"):
        export_peft_adapter(lora, str(tmp_path / "a"))
    model = trained_dude("llama")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        export_peft_adapter(model, str(tmp_path / "b"))


# --- merge ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_identical(arch):
    x = sample_input()
    model = trained_dude(arch)
    trained = logits(model, x)
    model.merge_adapter()
    assert rel_err(logits(model, x), trained) <= 1e-5
    model.unmerge_adapter()
    assert rel_err(logits(model, x), trained) <= 1e-5
    merged = model.merge_and_unload()
    assert not peft_ext_layers(merged)
    assert rel_err(logits(merged, x), trained) <= 1e-5


# --- bad input ------------------------------------------------------------------------------------------------------


def assert_untouched(model, before_state, x, ref):
    assert_same_state(before_state, model)
    assert not peft_ext_layers(model)
    assert torch.equal(logits(model, x), ref)


def test_rank_too_large_for_one_layer_leaves_model_untouched():
    """r=48 fits q_proj/o_proj (64×64) and the MLP (64×96, 96×64) but not k_proj/v_proj (32×64): the error comes after
    other layers were already wrapped, and every one of them is rolled back."""
    model = make_tiny("llama")
    x = sample_input()
    ref, before = logits(model, x), state_snapshot(model)
    with pytest.raises(ValueError) as err:
        get_peft_model(model, dude(r=48, lora_alpha=48))
    msg = str(err.value)
    assert "r=48" in msg and "k_proj" in msg and "min(in_features=64, out_features=32)" in msg and "Fix" in msg
    assert_untouched(model, before, x, ref)
    # the model can be adapted normally afterwards
    fixed = get_peft_model(model, dude(r=48, lora_alpha=48, rank_pattern={"k_proj": 32, "v_proj": 32}))
    assert rel_err(logits(fixed, x), ref) <= 1e-5


def test_no_module_matched_leaves_model_untouched():
    model = make_tiny("llama")
    x = sample_input()
    ref, before = logits(model, x), state_snapshot(model)
    with pytest.raises(ValueError, match="not_a_layer"):
        get_peft_model(model, dude(target_modules=["not_a_layer"]))
    assert_untouched(model, before, x, ref)


def test_unsupported_layer_type_leaves_model_untouched():
    model = make_tiny("llama")
    x = sample_input()
    ref, before = logits(model, x), state_snapshot(model)
    with pytest.raises(ValueError) as err:
        get_peft_model(model, dude(target_modules=["q_proj", "embed_tokens"]))
    assert "embed_tokens" in str(err.value) and "Embedding" in str(err.value) and "Fix" in str(err.value)
    assert_untouched(model, before, x, ref)


def test_non_finite_weight_leaves_model_untouched():
    model = make_tiny("llama")
    x = sample_input()
    ref = logits(model, x)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.*NaN or Inf"):
        get_peft_model(model, dude())
    assert_same_state(before, model)
    assert not peft_ext_layers(model)
    del ref


def test_unsupported_weight_format_is_refused_with_the_fix():
    """A quantized weight that is not bitsandbytes' (here a raw int8 tensor) cannot be decomposed: clear error, no
    change. (bitsandbytes 8-bit and 4-bit bases are supported: tests/test_quantized.py.)"""
    model = make_tiny("llama")
    x = sample_input()
    ref = logits(model, x)
    layer = model.model.layers[1].self_attn.v_proj
    layer.weight = torch.nn.Parameter(torch.randint(-8, 8, layer.weight.shape, dtype=torch.int8), requires_grad=False)
    before = state_snapshot(model)
    with pytest.raises(TypeError) as err:
        get_peft_model(model, dude())
    msg = str(err.value)
    assert "torch.int8" in msg and "layers.1.self_attn.v_proj" in msg and "load_in_8bit" in msg and "Fix" in msg
    assert_same_state(before, model)
    assert not peft_ext_layers(model)
    del ref


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="use_dora=False"):
        DuDeConfig(use_dora=False)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        DuDeConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="svd_niter=-1"):
        DuDeConfig(svd_niter=-1)
    with pytest.raises(ValueError, match="layer_replication"):
        DuDeConfig(layer_replication=[[0, 1]])


def test_second_residual_adapter_of_another_rank_is_refused():
    """A second residual-init adapter shares the layer's residual (a twin, tests/test_reference_model.py): one of
    another rank cannot, and is refused without a trace."""
    x = sample_input()
    model = trained_dude("llama")
    trained = logits(model, x)
    with pytest.raises(ValueError, match="already holds the residual-init adapter 'default' .* A second one shares"):
        model.add_adapter("other", dude(r=2))
    assert "other" not in model.peft_config
    for layer in peft_ext_layers(model).values():
        assert "other" not in layer.lora_A
    assert rel_err(logits(model, x), trained) <= 1e-6


def test_load_adapter_errors(tmp_path):
    get_peft_model(make_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="plain peft adapter"):
        load_adapter(make_tiny("llama"), str(tmp_path / "lora"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(make_tiny("llama"), str(tmp_path / "missing"))
    trained_dude("llama").save_pretrained(tmp_path / "dude")
    with pytest.raises(ValueError, match="model.layers.1.* base model it was trained from"):
        load_adapter(make_tiny("llama", layers=1), str(tmp_path / "dude"))
    # other weights are refused by their fingerprint first; past that check (a deliberate transfer), other shapes
    with pytest.raises(ValueError, match="q_proj' .*fingerprints differ"):
        load_adapter(make_tiny("llama", intermediate=80), str(tmp_path / "dude"))
    with pytest.raises(ValueError, match="mlp.* shapes .* base model it was trained from"):
        load_adapter(make_tiny("llama", intermediate=80), str(tmp_path / "dude"), check_base=False)


def test_public_api():
    assert {"DuDeConfig", "load_adapter", "export_peft_adapter"} <= set(peft_ext.__all__)
    assert issubclass(DuDeConfig, LoraConfig)


def test_magnitude_dtype_follows_16bit_adapters_only_under_zero3(monkeypatch):
    import peft_ext.variants

    model = get_peft_model(make_tiny("llama", dtype=torch.bfloat16), dude(), autocast_adapter_dtype=False)
    assert {l.lora_magnitude_vector["default"].weight.dtype for l in peft_ext_layers(model).values()} == {torch.float32}
    monkeypatch.setattr(peft_ext.variants, "is_deepspeed_zero3_enabled", lambda: True)
    model = get_peft_model(make_tiny("llama", dtype=torch.bfloat16), dude(), autocast_adapter_dtype=False)
    dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}  # no mixed dtypes among ZeRO-3's persistent parameters
