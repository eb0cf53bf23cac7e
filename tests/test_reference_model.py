"""With the adapters disabled (TRL's implicit reference model), unloaded or deleted, a residual-init layer gives the
original base model: W·x, not the residual (W − s·B0·A0)·x."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.helpers import ARCHS, corda, logits, make_tiny, perturb_trainable, rel_err, sample_input, token_batches

# a bf16 residual carries one bf16 rounding of W − s·B0·A0: the outputs differ from the bf16 base by that much
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def dude(**kwargs):
    from peft_ext import DuDeConfig

    return DuDeConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **kwargs})


def adapted(arch, method, dtype=torch.float32, seed=0):
    """(trained-looking PeftModel, the untouched base's logits, its state dict, the input)."""
    from peft_ext import calibrate

    model, x = make_tiny(arch, dtype=dtype, seed=seed), sample_input()
    base_logits, base_state = logits(model, x), {k: v.clone() for k, v in model.state_dict().items()}
    config = dude() if method == "dude" else corda(corda_method="kpm")
    if method == "corda":
        calibrate(model, config, token_batches(), verbose=False)
    pm = get_peft_model(model, config)
    perturb_trainable(pm, scale=0.5)
    return pm, base_logits, base_state, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["dude", "corda"])
@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_and_unload_give_the_original_model(arch, method, dtype):
    pm, base_logits, base_state, x = adapted(arch, method, dtype)
    trained = logits(pm, x)
    with pm.disable_adapter():
        error = rel_err(logits(pm, x), base_logits)
    assert error < TOL[dtype]
    assert rel_err(trained, base_logits) > 3 * max(error, 1e-6)  # the adapter does change the outputs
    assert torch.equal(logits(pm, x), trained)  # enabled again: the adapter's outputs, unchanged
    pm.merge_adapter()
    with pm.disable_adapter():  # peft unmerges first; the original weight again
        assert rel_err(logits(pm, x), base_logits) < TOL[dtype]
    base = pm.unload()
    assert rel_err(logits(base, x), base_logits) < TOL[dtype]
    for key, value in base.state_dict().items():
        atol = 1e-6 if dtype == torch.float32 else 2 * value.abs().max().item() * 2 ** -8  # one ulp of bf16
        torch.testing.assert_close(value, base_state[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_still_keeps_the_trained_delta(arch):
    pm, _, _, x = adapted(arch, "dude")
    trained = logits(pm, x)
    assert rel_err(logits(pm.merge_and_unload(), x), trained) < 1e-5


def test_other_adapters_and_mixed_batches_see_the_original_weight():
    """A plain LoRA beside the residual-init adapter, and rows of a mixed batch that ask for '__base__' or for it
    (CorDA: peft refuses mixed batches with DoRA, so DuDe has none)."""
    pm, base_logits, _, x = adapted("llama", "corda")
    plain = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    ref = make_tiny("llama")
    ref_plain = get_peft_model(ref, plain)
    pm.add_adapter("plain", plain)
    pm.load_state_dict({k.replace(".default.", ".plain."): v for k, v in ref_plain.state_dict().items()
                        if "lora_" in k}, strict=False)
    trained = logits(pm, x)
    pm.set_adapter("plain")
    assert rel_err(logits(pm, x), logits(ref_plain, x)) < 1e-5  # W + plain, not W_res + plain
    pm.set_adapter("default")
    with torch.no_grad():
        mixed = pm(input_ids=x, adapter_names=["__base__", "default"]).logits
    assert rel_err(mixed[0], base_logits[0]) < 1e-5 and rel_err(mixed[1], trained[1]) < 1e-5


def test_deleting_the_adapter_restores_the_weight():
    pm, base_logits, _, x = adapted("qwen2", "dude")
    pm.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))  # keeps the model a PeftModel
    pm.set_adapter("plain")
    pm.delete_adapter("default")
    assert rel_err(logits(pm, x), base_logits) < 1e-5  # a plain LoRA at init adds nothing


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_disabled_and_unloaded_within_quantization_error(bits, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is an optional extra: pip install -e .[bnb]")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny("llama").save_pretrained(tmp_path)
    q = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32)
    model.train()  # no CPU repacking of the 4-bit weights (see peft_ext.base_weight.no_cpu_repacking)
    x = sample_input()
    with torch.no_grad():
        base_logits = model(input_ids=x).logits.float()
    pm = get_peft_model(model, dude())
    with torch.no_grad():
        at_init = pm(input_ids=x).logits.float()  # quantize(W − s·B0·A0)·x + s·B0·A0·x
    perturb_trainable(pm, scale=0.5)
    with torch.no_grad():
        trained = pm(input_ids=x).logits.float()
        with pm.disable_adapter():
            disabled = pm(input_ids=x).logits.float()
        unloaded = pm.unload()(input_ids=x).logits.float()
    # the init-time model's distance to the quantized base is the quantization error of the residual (and, for this
    # DoRA-style adapter, of the norm of the quantized direction): the yardstick here
    init_error = rel_err(at_init, base_logits)
    assert rel_err(trained, base_logits) > 3 * init_error  # the adapter does change the outputs
    assert rel_err(disabled, base_logits) < 1.25 * init_error
    # unload: the residual plus s·B0·A0, quantized once more
    assert rel_err(unloaded, base_logits) < 1.5 * init_error


@pytest.mark.parametrize("method", ["dude", "corda"])
def test_dpo_implicit_reference_model_is_the_base(method, tiny_model_dir, tmp_path):
    """TRL's DPOTrainer with peft_config and no ref_model: at the first step the policy is the reference model
    (outputs unchanged at init, and the reference is the base), so the loss is log 2 and the rewards 0."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from peft_ext import calibrate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": f"What is {i} + {i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}."}
                              for i in range(8)])
    config = dude(r=8) if method == "dude" else corda(r=8)
    if method == "corda":
        calibrate(model, config, [tokenizer(["What is 1 + 1? 2.", "What is 3 + 4? 7."], padding=True,
                                            return_tensors="pt")])
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                     learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True, beta=0.1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config)
    assert trainer.ref_model is None  # the implicit reference: the policy with its adapter disabled
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert logged["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    # rewards are β·(policy − reference) log-prob differences: zero for both answers, not only their margin
    assert max(abs(logged[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")) < 1e-4


# --- a second stage after SFT: TRL copies the trained adapter as its reference ('ref') ------------------------------


def _sft_adapter(arch, method, path):
    """A saved 'SFT' adapter (the trainable factors moved away from their init) and its outputs."""
    pm, _, _, x = adapted(arch, method)
    pm.save_pretrained(path)
    return logits(pm, x), x


def _second_stage(kind, model, tokenizer, tmp_path):
    from datasets import Dataset

    common = dict(output_dir=str(tmp_path / kind), max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                  learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, beta=0.1, bf16=False)
    words = [f"w{i}" for i in range(20)]
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": f"{words[i]} {words[i + 1]}", "chosen": f" {words[i + 2]}",
                                   "rejected": f" {words[i + 3]}"} for i in range(8)])
        return DPOTrainer(model=model, args=DPOConfig(**common, max_length=32), train_dataset=data,
                          processing_class=tokenizer)
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_list([{"prompt": f"{words[i]} {words[i + 1]}"} for i in range(8)])
    args = GRPOConfig(**common, num_generations=2, max_completion_length=4, disable_dropout=True)  # as DPO's default
    return GRPOTrainer(model=model, args=args,
                       train_dataset=data, processing_class=tokenizer,
                       reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions])


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
@pytest.mark.parametrize("method", ["dude", "corda"])
@pytest.mark.parametrize("arch", ARCHS)
def test_second_stage_reference_is_the_trained_adapter(arch, method, kind, tmp_path):
    """DPO/GRPO (beta > 0) on a loaded, trainable DuDe/CorDA adapter: TRL adds a copy 'ref' of it, which shares the
    layer's residual. At the first step the policy is its reference (DPO: loss log 2, rewards 0; GRPO: KL 0), the
    reference is the trained adapter (not the base), and training moves the policy but never the reference."""
    from peft_ext import load_adapter

    from .helpers import word_tokenizer

    sft_logits, x = _sft_adapter(arch, method, tmp_path / "sft")
    model = load_adapter(make_tiny(arch), str(tmp_path / "sft"), is_trainable=True)
    tokenizer = word_tokenizer()
    tokenizer.eos_token = tokenizer.pad_token  # the tiny vocabulary has no token of its own to spare
    trainer = _second_stage(kind, model, tokenizer, tmp_path)
    assert set(model.peft_config) == {"default", "ref"}
    model.set_adapter("ref")
    assert torch.equal(logits(model, x), sft_logits)  # the reference is the SFT model, before any step
    model.set_adapter("default")
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    if kind == "dpo":
        assert logged["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
        assert max(abs(logged[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")) < 1e-4
    else:
        assert abs(logged["kl"]) < 1e-6
    assert rel_err(logits(model, x), sft_logits) > 1e-6  # the policy trained
    model.set_adapter("ref")
    assert torch.equal(logits(model, x), sft_logits)  # the reference did not move
    model.set_adapter("default")
    model.delete_adapter("ref")  # the policy keeps the shared residual
    with model.disable_adapter():
        assert rel_err(logits(model, x), logits(make_tiny(arch), x)) < 1e-5  # and the base is still the original


def test_twins_refuse_what_one_residual_cannot_hold():
    pm, _, _, x = adapted("llama", "dude")
    pm.add_adapter("ref", pm.peft_config["default"])
    with pytest.raises(ValueError, match="share one residual, so only one of them can be merged"):
        pm.base_model.merge_adapter(["default", "ref"])
    pm.base_model.set_adapter(["default", "ref"])
    with pytest.raises(ValueError, match=r"has the residual-init adapters \['default', 'ref'\] active at once"):
        logits(pm, x)
    with pytest.raises(ValueError, match=r"A second one shares its residual, so it needs the same method, rank"):
        pm.add_adapter("other", dude(r=2))
