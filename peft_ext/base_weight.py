"""Base-weight arithmetic shared by init, commit, reload and calibration: the residual W − s·B0·A0 (float or
bitsandbytes), dequantization, the float checkpoint of a quantized base, and 4-bit CPU repacking.

Quantized bases: the decomposition runs in float32 on the dequantized weight (or on the float checkpoint's weight,
`float_weights_path`), and the residual is quantized again with the layer's own settings (int8 row-wise; nf4/fp4 with
its block size, storage type and double quantization), so only the residual carries quantization error (the
QPiSSA/LoftQ observation).
"""

from __future__ import annotations

import functools
import glob
import json
import os
from contextlib import contextmanager
from typing import Optional

import torch
from safetensors import safe_open

from ._compat import bnb, dequantize_bnb_weight, dequantize_module_weight, gather_params_ctx, get_bnb_param_type


def subtract_init_product_(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> None:
    """W ← W − s·B0·A0, in place. The one place the residual is computed: init and reload both call it, so a reload
    rebuilds the residual bit for bit.

    float32 weights: one fused in-place GEMM (`addmm_`), no out×in temporary and no reallocation of the weight.
    Lower precisions: computed in float32 and cast back into the same storage.
    """
    A, B = lora_A.to(weight.device, torch.float32), lora_B.to(weight.device, torch.float32)
    if fan_in_fan_out:  # Conv1D stores Wᵀ: Wᵀ − s·Aᵀ·Bᵀ
        A, B = B.mT, A.mT
    if weight.dtype == torch.float32:
        weight.addmm_(B, A, alpha=-scaling)
    else:
        weight.copy_(torch.addmm(weight.float(), B, A, alpha=-scaling))


def dequantized_weight(base: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as a float tensor (bitsandbytes weights dequantized), without side effects.

    bitsandbytes CPU behaviours that peft's `dequantize_module_weight` does not handle:
    * it re-assigns an 8-bit CPU weight through `Int8Params.to()`, which leaves int8 data without row scales; the next
      forward copies `SCB=None` into the layer state and fails (the DoRA norm dequantizes on every step);
    * on the CPU it re-assigns a 4-bit weight through `.to()` too, a new parameter object on every DoRA forward;
    * on CPUs with AVX512-BF16, a no-grad eval forward repacks a 4-bit weight in place for its CPU kernel
      (`quant_state.packing_format_for_cpu`); `dequantize_4bit` then reads the packed layout as garbage, and
      bitsandbytes' inverse conversion does not restore the block scales either. peft_ext layers keep their 4-bit
      base from repacking (`PeftExtLinear4bit.train`); a weight repacked before it was wrapped is refused.
    """
    weight = base.weight
    kind = get_bnb_param_type(weight)
    if kind == "8bit":
        return dequantize_bnb_weight(weight, state=base.state)
    if kind == "4bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "peft_ext: a bitsandbytes 4-bit weight was repacked for the CPU kernel by a forward pass in eval mode, "
            "and cannot be dequantized any more. Fix: create the adapter before running the model in eval mode "
            "(or run such forwards inside peft_ext.base_weight.no_cpu_repacking(model)), or reload the model."
        )
    if kind == "4bit":
        # peft's dequantize_module_weight would also re-assign a CPU weight through `.to()`, which makes a new
        # Params4bit object every call: a DeepSpeed ZeRO-3 partitioned parameter loses its `ds_*` attributes that way
        return dequantize_bnb_weight(weight)
    return dequantize_module_weight(base)


def requantize_residual(base: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        source: Optional[torch.Tensor] = None) -> None:
    """Replace a bitsandbytes layer's weight by quantize(W − s·B0·A0), in its own format; W is `source` (the float
    weight from the checkpoint, see `float_weight`) or else the dequantized weight."""
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


@contextmanager
def no_cpu_repacking(model: torch.nn.Module):
    """Run no-grad forwards through a bitsandbytes 4-bit model without letting it repack its weights.

    On CPUs with AVX512-BF16, `Linear4bit.forward` repacks the weight in place for its CPU kernel on the first no-grad
    forward in eval mode; the inverse conversion is lossy for the block scales. Calibration (and anything else that
    must leave the model as it found it) runs the 4-bit layers in training mode, which only switches that repacking
    off (the layers have no dropout).
    """
    layers = [] if bnb is None else [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and not m.training]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def decomposable_weight(base: torch.nn.Module, fan_in_fan_out: bool, *, name: str, method: str,
                        float_weights_path: Optional[str]) -> tuple[torch.Tensor, Optional[tuple]]:
    """(W as float32 (out, in), float source) of a base layer, read without modifying it; the float source is
    (checkpoint, layer name, shape) when a bitsandbytes weight is decomposed from its float checkpoint, else None.
    Call it with the weight gathered (ZeRO-3). Raises a ValueError/TypeError naming the layer and the fix."""
    weight = base.weight
    kind = get_bnb_param_type(weight)
    if kind and hasattr(weight, "ds_id"):
        raise ValueError(
            f"peft_ext {method}: layer '{name}' is a bitsandbytes weight partitioned by DeepSpeed ZeRO-3; the "
            f"re-quantized residual cannot be written back into a partitioned parameter. Fix: create the "
            f"adapter before DeepSpeed partitions the model (transformers loads a bitsandbytes model whole on "
            f"every rank and the engine partitions it later, as trl_recipes.sft does), or use ZeRO-2/DDP."
        )
    if kind and float_weights_path:  # the float weight from the checkpoint: quantize the residual once (QPiSSA)
        source = (float_weights_path, name, (base.out_features, base.in_features))
        return float_weight(*source, method), source
    if kind:  # bitsandbytes 8-bit / 4-bit: decompose the dequantized weight
        try:
            return dequantized_weight(base).detach().float(), None
        except ValueError as exc:
            raise ValueError(f"peft_ext {method}: layer '{name}': {exc}") from None
    if weight.dtype in FLOAT_DTYPES:
        return (weight.detach().T if fan_in_fan_out else weight.detach()).float(), None
    raise TypeError(
        f"peft_ext {method}: layer '{name}' has a {weight.dtype} base weight "
        f"({type(base).__module__}.{type(base).__name__}), which peft_ext cannot decompose. Fix: load "
        f"the model in float32/bfloat16/float16, or quantized with bitsandbytes (load_in_8bit / "
        f"load_in_4bit), before get_peft_model."
    )


def write_residual_(base: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    fan_in_fan_out: bool, float_source: Optional[tuple] = None, method: str = "") -> None:
    """The base layer's weight becomes the residual W − s·B0·A0: in place for a float weight (gathered and written
    by rank 0 under ZeRO-3), re-quantized in its own format for a bitsandbytes one (W then read again from the float
    checkpoint when `float_source` is given)."""
    rebase_residual_(base, None, (lora_A, lora_B), scaling, fan_in_fan_out, float_source=float_source, method=method)


def rebase_residual_(base: torch.nn.Module, old: Optional[tuple[torch.Tensor, torch.Tensor]],
                     new: Optional[tuple[torch.Tensor, torch.Tensor]], scaling: float, fan_in_fan_out: bool,
                     float_source: Optional[tuple] = None, method: str = "") -> None:
    """Move the residual from one pair of init factors to another: W_res + s·B_old·A_old − s·B_new·A_new, where
    `old` None means the weight holds the original W and `new` None restores it (unload, delete). A float weight is
    changed in place; a bitsandbytes one is re-quantized once (from the float checkpoint when `float_source` is set,
    so restoring it gives back the weight quantized from that checkpoint)."""
    if get_bnb_param_type(base.weight):
        # W: from the float checkpoint; else the dequantized weight, plus s·B_old·A_old (requantize_residual
        # dequantizes the weight itself when the residual holds the original W)
        source = float_weight(*float_source, method) if float_source else None
        if source is None and old is not None:
            source = torch.addmm(dequantized_weight(base).float().to(old[1].device), old[1].float(), old[0].float(),
                                 alpha=scaling)
        if new is None:  # the original weight back: nothing to subtract (old or the float checkpoint gave W)
            new = (torch.zeros(0, source.shape[1]), torch.zeros(source.shape[0], 0))
        requantize_residual(base, new[0], new[1], scaling, source=source)
        return
    with gather_params_ctx(base.weight, modifier_rank=0):
        if old is not None:
            subtract_init_product_(base.weight.data, old[0], old[1], -scaling, fan_in_fan_out)
        if new is not None:
            subtract_init_product_(base.weight.data, new[0], new[1], scaling, fan_in_fan_out)


def weight_fingerprint(W: torch.Tensor) -> torch.Tensor:
    """16 numbers that tell one base weight (out, in) from another of the same shape: uᵢᵀ·W·vᵢ for fixed
    random ±1 vectors. A dtype change of the same weight (bf16, fp16) moves them by ~1e-3 relative, another
    checkpoint by ~1."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f = W.shape
    u = torch.randint(0, 2, (16, out_f), generator=g, dtype=torch.float64) * 2 - 1
    v = (torch.randint(0, 2, (in_f, 16), generator=g) * 2 - 1).to(W.device, torch.float32)
    Wv = (W.float() @ v).double().cpu()  # (out, 16); no float64 copy of W
    return (u * Wv.T).sum(dim=1).float()  # saved with the adapter's float32 tensors


def same_weight(a: torch.Tensor, b: torch.Tensor, rtol: float = 0.05) -> bool:
    """Whether two fingerprints come from the same weight (up to a dtype change or quantization error)."""
    return bool(torch.linalg.vector_norm(a.double() - b.double()) <= rtol * torch.linalg.vector_norm(b.double()))
