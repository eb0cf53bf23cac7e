"""bitsandbytes 8-bit / 4-bit layers with residual initialisation.

They are peft's bitsandbytes LoRA layers with peft_ext's `ResidualInitMixin`: their forward, DoRA handling and merge
(dequantize → merge → re-quantize) are peft's. How the residual is quantized again: `peft_ext.base_weight`; what that
does to the logits: benchmarks/results/bench_quantization/quantization_smollm2.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._compat import LoraLayer, LoraLinear4bit, LoraLinear8bitLt, bnb
from .layer import ResidualInitMixin


def bnb_layer_class(base: torch.nn.Module) -> Optional[type]:
    """The peft_ext layer class of a bitsandbytes base layer; None for other layers or without bitsandbytes."""
    if bnb is None:
        return None
    if isinstance(base, bnb.nn.Linear8bitLt):
        return PeftExtLinear8bitLt
    if isinstance(base, bnb.nn.Linear4bit):
        return PeftExtLinear4bit
    return None


def _init_bnb_layer(self, base_layer, adapter_name, config, r, lora_alpha, kwargs) -> None:
    # peft's bitsandbytes layers do not pass the module name on to update_layer; the reload from saved factors
    # (peft_ext.load_adapter) looks them up by that name
    torch.nn.Module.__init__(self)
    LoraLayer.__init__(self, base_layer)
    self.fan_in_fan_out = False
    self._active_adapter = adapter_name
    self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=kwargs.get("target_name"))


if LoraLinear8bitLt is not None:

    class PeftExtLinear8bitLt(ResidualInitMixin, LoraLinear8bitLt):
        """peft's 8-bit LoRA layer with residual initialisation (the residual is re-quantized to int8)."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            _init_bnb_layer(self, base_layer, adapter_name, config, r, lora_alpha, kwargs)

    class PeftExtLinear4bit(ResidualInitMixin, LoraLinear4bit):
        """peft's 4-bit LoRA layer with residual initialisation (the residual is re-quantized to nf4/fp4)."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            _init_bnb_layer(self, base_layer, adapter_name, config, r, lora_alpha, kwargs)
            self.get_base_layer().training = True

        def train(self, mode: bool = True):
            super().train(mode)
            # bitsandbytes' Linear4bit uses `training` only to decide whether to repack its weight for the CPU kernel;
            # a repacked weight can no longer be dequantized (DoRA's norm, merging, saving a residual): never repack
            self.get_base_layer().training = True
            return self
