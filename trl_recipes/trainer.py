"""TRL's SFTTrainer around the adapter: training arguments fitted to the device, the frozen A factors, and the
factor norms at init."""

from __future__ import annotations

import os

from .recipe import RecipeError


def fit_to_device(training_args, log) -> None:
    """Without a GPU: float32 (a bf16 matmul is ~100× slower than fp32 on this kind of CPU) and no pinned memory
    (it has nothing to pin to; torch warns about it)."""
    import torch

    if torch.cuda.is_available():
        return
    if training_args.bf16 or training_args.fp16:
        log("[trl_recipes] no GPU: training in float32 (a bf16 matmul is ~100× slower than fp32 on this kind of CPU)")
        training_args.bf16 = training_args.fp16 = False
    training_args.dataloader_pin_memory = False


def check_frozen_A(method_args, zero3: bool) -> None:
    """`--train_lora_A false` under ZeRO-3 only where the config carries it: the trainer then saves only trainable
    parameters, and only peft_ext's CorDA can put a frozen A back (`peft_ext.complete_saved_adapter`)."""
    ours = method_args.peft_method == "corda" and method_args.corda_implementation == "peft_ext"
    if zero3 and method_args.train_lora_A is False and not ours:
        raise RecipeError(
            f"--train_lora_A false with --peft_method {method_args.peft_method}"
            + (" --corda_implementation peft" if method_args.peft_method == "corda" else "")
            + " under DeepSpeed ZeRO-3: the trainer saves only trainable parameters, so the frozen A factors would be "
            "missing from the saved adapter. Fix: peft_ext's CorDA (--peft_method corda), ZeRO-2 or DDP, or leave "
            "--train_lora_A unset."
        )


def init_factor_norms(model) -> dict:
    """Per layer type (the last part of the module name, e.g. q_proj): the mean Frobenius norms of the adapter's
    lora_A and lora_B weights right after initialisation, and how many layers were averaged."""
    import torch

    sums: dict = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_A, torch.nn.ModuleDict) or "default" not in lora_A:
                continue
            kind = name.rsplit(".", 1)[-1]
            entry = sums.setdefault(kind, [0.0, 0.0, 0])
            entry[0] += float(lora_A["default"].weight.float().norm())
            entry[1] += float(lora_B["default"].weight.float().norm())
            entry[2] += 1
    return {k: {"A": a / n, "B": b / n, "layers": n} for k, (a, b, n) in sums.items()}


def build_trainer(model, tokenizer, train, peft_config, training_args, method_args, quantized: bool, main_process):
    """TRL's SFTTrainer with the adapter created; (trainer, factor norms at init). For peft's PiSSA/CorDA the initial
    adapter is saved for the conversion to a plain adapter at the end."""
    from trl import SFTTrainer

    from peft_ext import CorDAConfig, PeftExtConfig, expect_targets, is_deepspeed_zero3_enabled, settle_adapter_dtypes

    if isinstance(peft_config, PeftExtConfig) and main_process:
        expect_targets(model, peft_config)  # the init progress bar's total
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    if quantized:  # TRL cast the adapter of a quantized model to bf16 (QLoRA)
        settle_adapter_dtypes(trainer.model, sixteen_bit=training_args.bf16 or training_args.fp16,
                              zero3=is_deepspeed_zero3_enabled())
    if method_args.train_lora_A is False and not isinstance(peft_config, CorDAConfig):  # CorDA's config freezes A
        for name, param in trainer.model.named_parameters():  # before train() builds the optimizer and DeepSpeed
            if ".lora_A." in name:
                param.requires_grad_(False)
    if method_args.converts_at_save() and main_process:
        # peft's route to a plain adapter for PiSSA (and its CorDA): keep the initial factors, convert at save time
        config = trainer.model.peft_config["default"]
        init, config.init_lora_weights = config.init_lora_weights, True
        trainer.model.save_pretrained(os.path.join(training_args.output_dir, "pissa_init"))
        config.init_lora_weights = init
    return trainer, init_factor_norms(trainer.model)
