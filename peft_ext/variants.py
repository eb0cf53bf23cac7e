"""DoRA over a residual-init direction: the magnitude module and peft's DoRA variant around it."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import DoraLinearLayer, DoraLinearVariant, is_deepspeed_zero3_enabled, transpose
from .base_weight import dequantized_weight
from .linalg import dora_row_norm, safe_norm


class PeftExtMagnitude(DoraLinearLayer):
    """DoRA magnitude over a residual-init direction: float32, zero-row safe, factored row norm."""

    def set_magnitude(self, magnitude: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        self.weight = nn.Parameter(magnitude.detach().to(dtype).clone(), requires_grad=True)

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name: Optional[str] = None) -> torch.Tensor:
        # dense form, used by peft's DoRA merge; float32 and safe for zero rows
        weight = transpose(weight, self.fan_in_fan_out).float() + scaling * lora_weight.float()
        return safe_norm(torch.linalg.vector_norm(weight, dim=1))

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        weight = transpose(dequantized_weight(base_layer), self.fan_in_fan_out)  # (out, in)
        # detached (DoRA paper, 4.3): dora_row_norm runs under no_grad
        weight_norm = safe_norm(dora_row_norm(weight, lora_A.weight, lora_B.weight, scaling))
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:
            base_result = F.linear(x, weight.to(x.dtype))
        elif base_layer.bias is not None:
            base_result = base_result - base_layer.bias
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def __repr__(self) -> str:
        return "peft_ext." + super().__repr__()


def magnitude_dtype(adapter_dtype: torch.dtype, zero3: Optional[bool] = None) -> torch.dtype:
    """float32, except under DeepSpeed ZeRO-3 with 16-bit adapters (`zero3`: None reads DeepSpeed's config).

    ZeRO-3 gathers its small persistent parameters into one buffer of the first one's dtype and fails on mixed
    dtypes, which is why TRL creates adapters without upcasting them under ZeRO-3 (`autocast_adapter_dtype=False`).
    The magnitude then follows the adapter dtype; DeepSpeed's bf16/fp16 optimizer keeps float32 master weights, so
    its updates are still accumulated in float32. Everywhere else it is float32 (peft's upcast of the adapter keeps
    it so).
    """
    if zero3 is None:
        zero3 = is_deepspeed_zero3_enabled()
    if adapter_dtype in (torch.bfloat16, torch.float16) and zero3:
        return adapter_dtype
    return torch.float32


class PeftExtDoraVariant(DoraLinearVariant):
    """peft's DoRA variant; only the magnitude module differs (see `PeftExtMagnitude`).

    `forward`, `merge_safe` and `merge_unsafe` are peft's. (A plain `LoraConfig(use_dora=True)` added to the same
    layer resolves to peft's own variant, see `ResidualInitMixin.resolve_lora_variant`.)
    """

    @staticmethod
    def init(module, adapter_name: str, **kwargs: Any) -> None:
        state = module.residual_init_states()[adapter_name]
        if "lora_magnitude_vector" not in module.adapter_layer_names:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        magnitude = PeftExtMagnitude(fan_in_fan_out=module.fan_in_fan_out)
        magnitude.set_magnitude(state.magnitude, magnitude_dtype(module.lora_A[adapter_name].weight.dtype))
        module.lora_magnitude_vector[adapter_name] = magnitude

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # as peft's, but a row merged with a zero magnitude (it is zero) comes back without a division by zero
        delta_weight = module.get_delta_weight(active_adapter)
        weight_norm = module._cache_pop(f"{active_adapter}-weight_norm")
        dora_factor = module.lora_magnitude_vector[active_adapter].weight / weight_norm
        dora_factor = torch.where(dora_factor == 0, torch.ones_like(dora_factor), dora_factor)
        dora_factor = transpose(dora_factor.view(-1, 1), module.fan_in_fan_out)
        return (orig_weight.data / dora_factor - delta_weight).to(orig_weight.dtype)
