"""bitsandbytes 8-bit / 4-bit base weights: dequantize → decompose in float32 → re-quantize the residual.

The decomposition (DuDe's SVD, CorDA's context-oriented one) runs on the dequantized weight in float32; the frozen
base becomes the residual W − s·B0·A0, quantized again with the layer's own settings (int8 row-wise; nf4/fp4 with its
block size, storage type and double quantization). The principal part the adapter holds is kept in full precision,
so only the residual carries quantization error (the QPiSSA/LoftQ observation); see
benchmarks/results/quantization_smollm2.md for what that does to the logits.

The layers are peft's bitsandbytes LoRA layers with peft_ext's `ResidualInitMixin`: their forward, DoRA handling and
merge (dequantize → merge → re-quantize) are peft's.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
from contextlib import contextmanager
from typing import Optional

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.utils.integrations import get_bnb_param_type

from .layer import ResidualInitMixin, dequantized_weight


def requantize_residual(base: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        source: Optional[torch.Tensor] = None) -> None:
    """Replace a bitsandbytes layer's weight by quantize(W − s·B0·A0), in its own format; W is `source` (the float
    weight from the checkpoint, see `float_weight`) or else the dequantized weight."""
    import bitsandbytes as bnb

    weight = base.weight
    dequantized = dequantized_weight(base) if source is None else source
    residual = torch.addmm(dequantized.to(weight.device, torch.float32), lora_B.to(weight.device, torch.float32),
                           lora_A.to(weight.device, torch.float32), alpha=-scaling)
    if source is None:
        residual = residual.to(dequantized.dtype)
    kind = get_bnb_param_type(weight)
    if kind == "8bit":
        base.weight = bnb.nn.Int8Params(residual.cpu(), requires_grad=False,
                                        has_fp16_weights=weight.has_fp16_weights).to(weight.device)
        base.state.reset_grads()  # drop the row scales cached for the old weight
    elif kind == "4bit":
        base.weight = bnb.nn.Params4bit(residual.cpu(), requires_grad=False, quant_type=weight.quant_type,
                                        quant_storage=weight.quant_storage, blocksize=weight.blocksize,
                                        compress_statistics=weight.compress_statistics,
                                        module=weight.module).to(weight.device)
    else:  # pragma: no cover - callers check get_bnb_param_type first
        raise TypeError(f"not a bitsandbytes weight: {type(weight).__name__}")


@functools.lru_cache(maxsize=4)
def _checkpoint_index(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, for a .safetensors file or a folder (single file or sharded index)."""
    from safetensors import safe_open

    if os.path.isfile(path):
        files = [path]
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    result = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            result.update(dict.fromkeys(f.keys(), file))
    return result


def float_weight(path: str, name: str, shape: tuple[int, int], method: str) -> torch.Tensor:
    """The float32 weight (out, in) of layer `name` read from the checkpoint `path` (`float_weights_path`)."""
    from safetensors import safe_open

    fix = ("Fix: set float_weights_path to the float checkpoint the quantized model was loaded from, or to None to "
           "decompose the dequantized weights.")
    if not os.path.exists(path):
        raise ValueError(f"peft_ext {method}: float_weights_path={path!r} does not exist (layer '{name}'). {fix}")
    index = _checkpoint_index(path)
    # the model's module names may carry a prefix the checkpoint of a base-model class does not have, or vice versa
    parts = name.split(".")
    keys = [".".join(parts[i:]) + ".weight" for i in range(len(parts))]
    key = next((k for k in keys if k in index), None)
    if key is None:
        raise ValueError(
            f"peft_ext {method}: float_weights_path={path!r} has no tensor '{name}.weight' for layer '{name}'. {fix}"
        )
    with safe_open(index[key], framework="pt") as f:
        tensor = f.get_tensor(key)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"peft_ext {method}: '{key}' in float_weights_path={path!r} has shape {tuple(tensor.shape)}, but layer "
            f"'{name}' is {tuple(shape)}. {fix}"
        )
    if not tensor.is_floating_point():
        raise ValueError(f"peft_ext {method}: '{key}' in float_weights_path={path!r} is {tensor.dtype}. {fix}")
    return tensor.float()


def bnb_layer_class(base: torch.nn.Module) -> Optional[type]:
    import bitsandbytes as bnb

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


try:
    from peft.tuners.lora.bnb import Linear4bit as _LoraLinear4bit
    from peft.tuners.lora.bnb import Linear8bitLt as _LoraLinear8bitLt
except ImportError:  # bitsandbytes is an optional extra
    _LoraLinear8bitLt = _LoraLinear4bit = None

if _LoraLinear8bitLt is not None:

    class PeftExtLinear8bitLt(ResidualInitMixin, _LoraLinear8bitLt):
        """peft's 8-bit LoRA layer with residual initialisation (the residual is re-quantized to int8)."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            _init_bnb_layer(self, base_layer, adapter_name, config, r, lora_alpha, kwargs)

    class PeftExtLinear4bit(ResidualInitMixin, _LoraLinear4bit):
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


@contextmanager
def no_cpu_repacking(model: torch.nn.Module):
    """Run no-grad forwards through a bitsandbytes 4-bit model without letting it repack its weights.

    On CPUs with AVX512-BF16, `Linear4bit.forward` repacks the weight in place for its CPU kernel on the first no-grad
    forward in eval mode; the inverse conversion is lossy for the block scales. Calibration (and anything else that
    must leave the model as it found it) runs the 4-bit layers in training mode, which only switches that repacking
    off (the layers have no dropout).
    """
    layers = []
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and not m.training]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False
