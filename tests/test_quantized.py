"""bitsandbytes 8-bit and 4-bit (nf4) bases: decompose the dequantized weight, re-quantize the residual, train."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_ext import CorDAConfig, DuDeConfig, calibrate, export_peft_adapter, load_adapter

from .helpers import (FAST, SMOL, check_finished_run, logits, make_tiny, perturb_trainable, rel_err, run_cli,
                      sample_input, token_batches)

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional extra: pip install -e .[bnb]")


# bitsandbytes' CPU nf4 matmul needs input dimensions that are multiples of its 64-element blocks
INTERMEDIATE = 128


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-fp32")
    make_tiny("llama", intermediate=INTERMEDIATE).save_pretrained(path)
    return str(path)


def load(path, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 8:
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q)


def adapt(model, method, **kwargs):
    if method.endswith("-budgeted"):  # e.g. corda-kpm-budgeted: rank_allocation="budgeted"
        method, kwargs = method[: -len("-budgeted")], {**kwargs, "rank_allocation": "budgeted"}
    if method == "dude":
        config = DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear", **kwargs)
    else:
        config = CorDAConfig(r=4, lora_alpha=8, target_modules="all-linear", corda_method=method.split("-")[1],
                             **kwargs)
        calibrate(model, config, token_batches(), verbose=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize("method", ["dude", "corda-ipm", "corda-kpm", "corda-kpm-budgeted"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_init_train_save_load_export(bits, method, fp32_dir, tmp_path):
    from peft_ext.quantization import PeftExtLinear4bit, PeftExtLinear8bitLt

    x = sample_input()
    fp32 = logits(make_tiny("llama", intermediate=INTERMEDIATE), x)
    quantized = logits(load(fp32_dir, bits), x)
    model = adapt(load(fp32_dir, bits), method)
    layers = [m for m in model.modules() if isinstance(m, (PeftExtLinear8bitLt, PeftExtLinear4bit))]
    assert len(layers) == 14
    expected = bnb.nn.Int8Params if bits == 8 else bnb.nn.Params4bit
    assert all(isinstance(m.get_base_layer().weight, expected) for m in layers)  # the residual is re-quantized
    init = logits(model, x)
    err_base = rel_err(quantized, fp32)
    # the decomposition runs on the dequantized weight, so the init reproduces the quantized model up to one more
    # quantization of the residual (≈ the same scale as W on these random, flat-spectrum weights); real weights:
    # benchmarks/results/bench_quantization/quantization_smollm2.md
    assert rel_err(init, quantized) < 2.5 * err_base, (err_base, rel_err(init, quantized))

    model.train()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    perturb_trainable(model)
    trained = logits(model, x)
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_adapter(load(fp32_dir, bits), str(tmp_path / "saved"))
    assert rel_err(logits(reloaded, x), trained) <= 1e-5  # same dequantize → residual → quantize path: exact
    # the plain export applies to the untouched quantized base: equal up to quantizing W instead of the residual
    out = export_peft_adapter(str(tmp_path / "saved"), str(tmp_path / "plain"))
    plain = logits(PeftModel.from_pretrained(load(fp32_dir, bits), out), x)
    assert rel_err(plain, trained) < 2.5 * err_base


@pytest.mark.parametrize("method", ["dude", "corda-kpm"])
@pytest.mark.parametrize("bits", [8, 4])
def test_decomposition_from_the_float_checkpoint(bits, method, fp32_dir, tmp_path):
    """float_weights_path: decompose the float weight, quantize the residual once (QPiSSA) — closer to the float
    model than dequantize → decompose → quantize again, and reloaded exactly from the same checkpoint."""
    import shutil

    from safetensors.torch import load_file

    from peft_ext.base_weight import dequantized_weight

    from .helpers import assert_same_state, state_snapshot

    x = sample_input()
    fp32 = logits(make_tiny("llama", intermediate=INTERMEDIATE), x)
    double_model = adapt(load(fp32_dir, bits), method)
    double = logits(double_model, x)
    model = adapt(load(fp32_dir, bits), method, float_weights_path=fp32_dir)
    single = logits(model, x)
    # DuDe moves the principal part out of the quantized base, so quantizing once is clearly better; KPM's adapter
    # holds the smallest components and its residual is nearly W: re-quantizing it changes little either way
    slack = 1.0 if method == "dude" else 1.02
    assert rel_err(single, fp32) < slack * rel_err(double, fp32), (rel_err(single, fp32), rel_err(double, fp32))

    name = "model.layers.1.mlp.up_proj"
    W = load_file(os.path.join(fp32_dir, "model.safetensors"))[name + ".weight"]

    def residual_error(m):
        """|stored residual − (float W − s·B0·A0)|: what the frozen base gets wrong against the float model"""
        layer = m.base_model.model.get_submodule(name)
        init = layer.scaling["default"] * layer.lora_init_B["default"] @ layer.lora_init_A["default"]
        return (dequantized_weight(layer.get_base_layer()).float() - (W - init)).abs()

    err, err_double = residual_error(model), residual_error(double_model)
    assert err.mean() < 0.8 * err_double.mean(), (err.mean(), err_double.mean())
    if bits == 8:  # one row-wise int8 rounding (of the fp16-cast residual): about half a step of max|row|/127
        layer = model.base_model.model.get_submodule(name)
        residual = W - layer.scaling["default"] * layer.lora_init_B["default"] @ layer.lora_init_A["default"]
        assert (err <= 0.55 * residual.abs().amax(dim=1, keepdim=True) / 127).all()
    layer = model.base_model.model.get_submodule(name)
    if method == "dude":  # the magnitude is the float weight's row norm
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, W.norm(dim=1))

    perturb_trainable(model)
    trained = logits(model, x)
    model.save_pretrained(tmp_path / "saved")
    assert load_config_field(tmp_path / "saved", "float_weights_path") == fp32_dir
    assert rel_err(logits(load_adapter(load(fp32_dir, bits), str(tmp_path / "saved")), x), trained) <= 1e-5
    copy = shutil.copytree(fp32_dir, tmp_path / "elsewhere")  # the same weights in another place
    reloaded = load_adapter(load(fp32_dir, bits), str(tmp_path / "saved"), float_weights_path=str(copy))
    assert rel_err(logits(reloaded, x), trained) <= 1e-5

    fresh = load(fp32_dir, bits)  # a missing checkpoint: clear error, model untouched
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match="float_weights_path=.*does not exist.*Fix"):
        load_adapter(fresh, str(tmp_path / "saved"), float_weights_path=str(tmp_path / "nowhere"))
    assert_same_state(before, fresh)


def test_float_checkpoint_of_another_model_is_refused(fp32_dir, tmp_path):
    from .helpers import assert_same_state, state_snapshot

    other = tmp_path / "other"
    make_tiny("qwen2").save_pretrained(other)
    model = load(fp32_dir, 4)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="float_weights_path=.*(has no tensor|has shape).*Fix"):
        adapt(model, "dude", float_weights_path=str(other))
    assert_same_state(before, model)


def load_config_field(path, key):
    import json

    return json.load(open(os.path.join(path, "adapter_config.json")))[key]


@pytest.mark.parametrize("flag", ["--load_in_8bit", "--load_in_4bit"])
def test_sft_with_quantized_base(flag, tiny_model_dir, tmp_path):
    """The recipe trains on a quantized base: the held-out answers before training must not repack the 4-bit weights
    (which the init could not dequantize any more), and TRL's bf16 cast of QLoRA adapters is undone in an fp32 run."""
    from safetensors.torch import load_file


    out = tmp_path / "run"
    proc = run_cli("--config", os.path.join(SMOL, "dude", "config_cpu.yaml"), "--model_name_or_path",
                   tiny_model_dir, flag, "--output_dir", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_finished_run(out, "dude")
    state = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.float32}
    # --float_weights auto: the model's own float checkpoint was decomposed, the residual quantized once
    assert load_config_field(out / "adapter", "float_weights_path") == tiny_model_dir


def test_quantization_checks_for_zero3():
    from trl import ModelConfig

    from trl_recipes.quantized import RecipeError, check_quantization

    with pytest.raises(RecipeError, match="load_in_8bit.*ZeRO-3.*zero2.yaml"):
        check_quantization(ModelConfig(load_in_8bit=True), zero3=True)
    check_quantization(ModelConfig(load_in_8bit=True), zero3=False)
    args = ModelConfig(load_in_4bit=True, dtype="bfloat16")
    check_quantization(args, zero3=True)
    assert args.bnb_4bit_quant_storage == "bfloat16"  # set to the compute dtype
    with pytest.raises(RecipeError, match="bnb_4bit_quant_storage"):
        check_quantization(ModelConfig(load_in_4bit=True, dtype="bfloat16", bnb_4bit_quant_storage="uint8"),
                           zero3=True)


def test_4bit_weight_repacked_for_the_cpu_kernel_is_refused_or_absent(fp32_dir):
    """On CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights on an eval forward, irreversibly for the block
    scales. peft_ext refuses such a weight with the fix; calibration and peft_ext's own layers never repack."""
    x = sample_input()
    model = load(fp32_dir, 4)
    packed = lambda m: getattr(m.model.layers[0].self_attn.q_proj.weight.quant_state,  # noqa: E731
                               "packing_format_for_cpu", False)
    config = CorDAConfig(r=4, lora_alpha=8, target_modules="all-linear")
    calibrate(model, config, token_batches(), verbose=False)
    assert not packed(model)  # calibration ran eval forwards without repacking
    logits(model, x)  # a plain eval forward: bitsandbytes repacks here if this CPU has AVX512-BF16
    if packed(model):
        with pytest.raises(ValueError, match="repacked for the CPU kernel.*Fix"):
            get_peft_model(model, config)
    else:
        peft_model = get_peft_model(model, config)
        logits(peft_model, x)
        assert not packed(peft_model.base_model.model)


def test_bnb_weight_partitioned_by_zero3_is_refused(fp32_dir):
    from .helpers import assert_same_state, state_snapshot

    model = load(fp32_dir, 4)
    model.model.layers[1].mlp.up_proj.weight.ds_id = 7  # what DeepSpeed ZeRO-3 attaches to a partitioned parameter
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.*partitioned by DeepSpeed ZeRO-3.*Fix"):
        get_peft_model(model, DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert_same_state(before, model)


def test_trl_qlora_bf16_cast_is_settled(fp32_dir):
    """TRL casts a quantized model's adapter factors (not the DoRA magnitude) to bf16. An fp32 run gets the exact
    initial factors back in fp32 (outputs at step 0 equal the base's again); a 16-bit ZeRO-3 run gets one dtype."""
    from peft_ext import settle_adapter_dtypes

    x = sample_input()
    peft_model = get_peft_model(load(fp32_dir, 4), DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    at_init = logits(peft_model, x)

    def trl_cast():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)

    trl_cast()
    settle_adapter_dtypes(peft_model, sixteen_bit=False, zero3=False)
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A["default"].weight, layer.lora_init_A["default"])
    assert torch.equal(layer.lora_B["default"].weight, layer.lora_init_B["default"])
    assert torch.equal(logits(peft_model, x), at_init)

    trl_cast()
    settle_adapter_dtypes(peft_model, sixteen_bit=True, zero3=False)  # magnitude stays fp32 without ZeRO-3
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    settle_adapter_dtypes(peft_model, sixteen_bit=True, zero3=True)
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.bfloat16}
