"""Adapter dtypes after a trainer's 16-bit cast of a quantized model's adapter (TRL's QLoRA recipe)."""

from __future__ import annotations

from typing import Optional

import torch

from .variants import magnitude_dtype


def settle_adapter_dtypes(model: torch.nn.Module, *, sixteen_bit: bool, zero3: Optional[bool] = None) -> None:
    """Fix up the cast that TRL's SFTTrainer (and others) apply to a quantized model's trainable parameters: all but
    DoRA's magnitude go to bf16, the QLoRA paper's recipe for 16-bit training.

    * `sixteen_bit=False` (an fp32 run, e.g. on a CPU): the cast would make every adapter matmul a bf16 one and round
      DuDe's / CorDA's principal factors, so that the model at step 0 no longer equals the base. The factors are put
      back in float32 from the exact initial ones peft_ext keeps (`lora_init_A/B`); other trainable parameters are
      cast back to float32.
    * `sixteen_bit=True`: the DoRA magnitude follows the factors' dtype where DeepSpeed ZeRO-3 needs one dtype
      (`zero3`; None reads DeepSpeed's config), and a frozen A (CorDA-KPM's), which the cast of the trainable
      parameters skipped, follows the factors, so each adapter computes in one dtype.
    """
    if sixteen_bit:
        dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_magnitude" not in n}
        if len(dtypes) == 1:
            factors = next(iter(dtypes))
            target = magnitude_dtype(factors, zero3=zero3)
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.data = param.data.to(target)
                elif ".lora_A." in name and not param.requires_grad:
                    param.data = param.data.to(factors)
        return
    for module in model.modules():
        init_A, init_B = getattr(module, "lora_init_A", {}), getattr(module, "lora_init_B", {})
        for adapter, layer in getattr(module, "lora_A", {}).items():
            if adapter in init_A:
                layer.weight.data = init_A[adapter].to(torch.float32).clone()
                module.lora_B[adapter].weight.data = init_B[adapter].to(torch.float32).clone()
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
