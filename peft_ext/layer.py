"""peft's LoRA layer, initialised from a decomposition of the base weight, whose base weight becomes the residual.

Both methods of this package share this layer: a method computes init factors (A0, B0) from the base weight W; the
trainable `lora_A`/`lora_B` start at A0/B0 and the frozen base weight becomes W − s·B0·A0, so that the layer's output
is unchanged at init. A0/B0 are kept as buffers (`lora_init_A`, `lora_init_B`) that peft saves with the adapter: they
are what rebuilds the residual on reload (`peft_ext.load_adapter`) and what turns the adapter into a plain peft one
(`peft_ext.export_peft_adapter`).

With `use_dora=True` the DoRA variant is peft's `DoraLinearVariant` (forward, merge) with a magnitude module that keeps
the magnitude in float32, starts it at the row norms of the original W, never divides by a zero norm, and computes the
row norm in factored form (see `peft_ext.linalg.dora_row_norm`).

Atomic injection: peft creates the layers one after another and gives a config no hook before it starts. So a layer
validates its input and computes its factors *without* touching the base weight; the base weights are rewritten only
when peft activates the adapter after all layers were created (`set_adapter`, "commit"). If any target fails, the layers
already created in this call are removed again ("rollback") and no weight was ever modified.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import (
    dequantize_bnb_weight,
    dequantize_module_weight,
    gather_params_ctx,
    get_bnb_param_type,
)
from peft.utils.other import transpose
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .distributed import broadcast_, dist_info
from .linalg import dora_row_norm, safe_norm


PEFT_EXT_INIT = "peft_ext"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class _InitState:
    """What a layer knows about one residual-init adapter between creation and commit."""

    lora_A: torch.Tensor  # A0, (r, in), float32
    lora_B: torch.Tensor  # B0, (out, r), float32
    magnitude: Optional[torch.Tensor]  # row norms of the original weight, (out,), float32; dropped at commit
    scaling: float
    config: Any = None  # the config of the injection that created it, until commit
    pending: bool = True  # base weight not yet replaced by the residual
    float_source: Optional[tuple] = None  # (checkpoint, layer name, shape): quantized base decomposed from its float weight


class _Injection:
    """The layers that received a residual-init adapter in the current `get_peft_model` call and are not committed."""

    def __init__(self, method: str):
        self.entries: list[tuple[PeftExtLinear, str, bool]] = []
        self.progress = tqdm(desc=f"peft_ext {method} init", unit="layer", leave=False)

    def close(self) -> None:
        self.progress.close()


def _injection(config) -> _Injection:
    inj = config.__dict__.get("_peft_ext_injection")
    if inj is None:
        inj = _Injection(config.peft_ext_method)
        config.__dict__["_peft_ext_injection"] = inj
    return inj


def _replace_child_module(old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits in its parent module(s): undoes peft's `setattr(parent, name, wrapper)`.

    A layer does not know its parent, so the parent's `_modules` dict is found through the garbage collector's
    referrer graph. Only used on the error path.
    """
    for d in gc.get_referrers(old):
        if not isinstance(d, dict):
            continue
        is_modules_dict = any(
            (isinstance(o, dict) and o.get("_modules") is d) or (isinstance(o, nn.Module) and o._modules is d)
            for o in gc.get_referrers(d)
        )
        if is_modules_dict:
            for name, child in list(d.items()):
                if child is old:
                    d[name] = new


def rollback_injection(config) -> None:
    """Remove every adapter this injection added; wrappers it created are replaced by their base layer again."""
    inj = config.__dict__.pop("_peft_ext_injection", None)
    config.__dict__.pop("_peft_ext_stored_init", None)
    if inj is None:
        return
    for layer, adapter_name, created in reversed(inj.entries):
        layer._peft_ext_state.pop(adapter_name, None)
        if created:
            _replace_child_module(layer, layer.get_base_layer())
        else:
            layer.delete_adapter(adapter_name)
    inj.close()


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


def dequantized_weight(base: nn.Module) -> torch.Tensor:
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
            "(or run such forwards inside peft_ext.quantization.no_cpu_repacking(model)), or reload the model."
        )
    if kind == "4bit":
        # peft's dequantize_module_weight would also re-assign a CPU weight through `.to()`, which makes a new
        # Params4bit object every call: a DeepSpeed ZeRO-3 partitioned parameter loses its `ds_*` attributes that way
        return dequantize_bnb_weight(weight)
    return dequantize_module_weight(base)


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
        from transformers.integrations import is_deepspeed_zero3_enabled

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
    def init(module: PeftExtLinear, adapter_name: str, **kwargs: Any) -> None:
        state = module._peft_ext_state[adapter_name]
        if "lora_magnitude_vector" not in module.adapter_layer_names:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        magnitude = PeftExtMagnitude(fan_in_fan_out=module.fan_in_fan_out)
        magnitude.set_magnitude(state.magnitude, magnitude_dtype(module.lora_A[adapter_name].weight.dtype))
        module.lora_magnitude_vector[adapter_name] = magnitude

    @staticmethod
    def unmerge(module: PeftExtLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # as peft's, but a row merged with a zero magnitude (it is zero) comes back without a division by zero
        delta_weight = module.get_delta_weight(active_adapter)
        weight_norm = module._cache_pop(f"{active_adapter}-weight_norm")
        dora_factor = module.lora_magnitude_vector[active_adapter].weight / weight_norm
        dora_factor = torch.where(dora_factor == 0, torch.ones_like(dora_factor), dora_factor)
        dora_factor = transpose(dora_factor.view(-1, 1), module.fan_in_fan_out)
        return (orig_weight.data / dora_factor - delta_weight).to(orig_weight.dtype)


class ResidualInitMixin:
    """What every peft_ext layer adds to a peft LoRA layer: the method's decomposition as init, the factor buffers,
    the residual base weight, commit and rollback. Mixed into peft's `lora.Linear` (`PeftExtLinear`) and its
    bitsandbytes layers (`peft_ext.quantization`).

    The method-specific work (an SVD for DuDe, a context-oriented decomposition for CorDA) is the config's
    `compute_init_factors`.
    """

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "peft_ext_method", None) is None:  # a plain LoraConfig added to this layer
            return super().resolve_lora_variant(config=config, **kwargs)
        return PeftExtDoraVariant() if config.use_dora else None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        created = "_peft_ext_state" not in self.__dict__
        if created:
            self._peft_ext_state: dict[str, _InitState] = {}
            self._peft_ext_updating = False
            self.lora_init_A = BufferDict(persistent=True)
            self.lora_init_B = BufferDict(persistent=True)
        if getattr(config, "peft_ext_method", None) is None:  # a plain LoraConfig added to this layer
            return super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

        name = kwargs.get("target_name") or "<unnamed>"
        existed = adapter_name in self.lora_A or adapter_name in self._peft_ext_state  # never undone by this call
        try:
            state = self._prepare(r, lora_alpha, config, name)
            self._peft_ext_state[adapter_name] = state
            self._peft_ext_updating = True
            try:
                super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
            finally:
                self._peft_ext_updating = False
            self.lora_init_A[adapter_name] = state.lora_A
            self.lora_init_B[adapter_name] = state.lora_B
        except BaseException:
            if not existed:  # remove only what this call added; an adapter of the same name from before stays intact
                self._peft_ext_state.pop(adapter_name, None)
                if not created and adapter_name in self.lora_A:
                    self.delete_adapter(adapter_name)
            rollback_injection(config)
            raise
        state.config = config
        inj = _injection(config)
        inj.entries.append((self, adapter_name, created))
        inj.progress.update(1)

    def _prepare(self, r: int, lora_alpha: float, config, name: str) -> _InitState:
        """Validate this target and compute its init factors; the base weight is not modified."""
        method = config.peft_ext_method
        if self._peft_ext_state:
            raise ValueError(
                f"peft_ext {method}: layer '{name}' already holds the residual-init adapter "
                f"'{next(iter(self._peft_ext_state))}'. Both would rewrite the same base weight. Fix: merge_and_unload() "
                f"or unload() the model first, or add a plain LoraConfig adapter instead."
            )
        base = self.get_base_layer()
        with gather_params_ctx(base.weight):
            weight = base.weight
            if get_bnb_param_type(weight) and hasattr(weight, "ds_id"):
                raise ValueError(
                    f"peft_ext {method}: layer '{name}' is a bitsandbytes weight partitioned by DeepSpeed ZeRO-3; the "
                    f"re-quantized residual cannot be written back into a partitioned parameter. Fix: create the "
                    f"adapter before DeepSpeed partitions the model (transformers loads a bitsandbytes model whole on "
                    f"every rank and the engine partitions it later, as trl_recipes.sft does), or use ZeRO-2/DDP."
                )
            float_source = None
            if get_bnb_param_type(weight) and getattr(config, "float_weights_path", None):
                # the float weight from the checkpoint: decompose it, quantize the residual once (QPiSSA)
                from .quantization import float_weight

                shape = (base.out_features, base.in_features)
                float_source = (config.float_weights_path, name, shape)
                W = float_weight(*float_source, method)
            elif get_bnb_param_type(weight):  # bitsandbytes 8-bit / 4-bit: decompose the dequantized weight
                try:
                    W = dequantized_weight(base).detach().float()
                except ValueError as exc:
                    raise ValueError(f"peft_ext {method}: layer '{name}': {exc}") from None
            elif weight.dtype in FLOAT_DTYPES:
                W = transpose(weight.detach(), self.fan_in_fan_out).float()  # (out, in)
            else:
                raise TypeError(
                    f"peft_ext {method}: layer '{name}' has a {weight.dtype} base weight "
                    f"({type(base).__module__}.{type(base).__name__}), which peft_ext cannot decompose. Fix: load "
                    f"the model in float32/bfloat16/float16, or quantized with bitsandbytes (load_in_8bit / "
                    f"load_in_4bit), before get_peft_model."
                )
            out_features, in_features = W.shape
            if r > min(out_features, in_features):
                raise ValueError(
                    f"peft_ext {method}: r={r} is larger than min(in_features={in_features}, "
                    f"out_features={out_features}) of layer '{name}'. Fix: lower r, or give this layer a smaller rank "
                    f"with rank_pattern={{'{name.rsplit('.', 1)[-1]}': {min(out_features, in_features)}}}."
                )
            if not torch.isfinite(W.sum()):  # a NaN or Inf anywhere makes the sum non-finite; no out×in mask
                raise ValueError(
                    f"peft_ext {method}: layer '{name}' has NaN or Inf in its base weight; it cannot be decomposed. "
                    f"Fix: check the checkpoint, or leave this layer out of target_modules."
                )
            scaling = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
            stored = (config.__dict__.get("_peft_ext_stored_init") or {}).get(name)
            if stored is not None:
                lora_A, lora_B = (t.to(device=W.device, dtype=torch.float32) for t in stored)
                if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
                    raise ValueError(
                        f"peft_ext {method}: the saved init factors of layer '{name}' have shapes "
                        f"{tuple(lora_A.shape)}/{tuple(lora_B.shape)}, but the model needs ({r}, {in_features})/"
                        f"({out_features}, {r}). Fix: load the adapter onto the base model it was trained from."
                    )
            else:
                lora_A, lora_B = config.compute_init_factors(self, W, r=r, scaling=scaling, name=name)
            if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
                raise ValueError(
                    f"peft_ext {method}: the decomposition of layer '{name}' produced NaN/Inf factors. "
                    f"Fix: check the base weight (and the calibration data for CorDA)."
                )
            magnitude = torch.linalg.vector_norm(W, dim=1)
        lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
        if hasattr(weight, "ds_id") and dist_info()[1] > 1:
            # ZeRO-3: every rank decomposed the same gathered weight; make the result identical by construction
            for t in (lora_A, lora_B, magnitude):
                broadcast_(t, src=0)
        return _InitState(lora_A, lora_B, magnitude, scaling, float_source=float_source)

    def reset_lora_parameters(self, adapter_name, init_lora_weights):
        state = getattr(self, "_peft_ext_state", {}).get(adapter_name)
        if init_lora_weights == PEFT_EXT_INIT and state is not None:
            self.lora_A[adapter_name].weight.data = state.lora_A.clone()
            self.lora_B[adapter_name].weight.data = state.lora_B.clone()
            return
        super().reset_lora_parameters(adapter_name, init_lora_weights)

    # --- commit ---------------------------------------------------------------------------------------------------

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        # peft activates the adapter once more after it created all layers: that is the end of the injection
        if not getattr(self, "_peft_ext_updating", True):
            self._commit()

    def _commit(self) -> None:
        """Replace the base weight by the residual for every pending adapter of this layer."""
        for state in getattr(self, "_peft_ext_state", {}).values():
            if not state.pending:
                continue
            base = self.get_base_layer()
            if get_bnb_param_type(base.weight):
                from .quantization import float_weight, requantize_residual

                # the float weight is read again rather than held: all layers commit at the end of the injection
                method = getattr(state.config, "peft_ext_method", "")
                source = float_weight(*state.float_source, method) if state.float_source else None
                requantize_residual(base, state.lora_A, state.lora_B, state.scaling, source=source)
            else:
                with gather_params_ctx(base.weight, modifier_rank=0):
                    subtract_init_product_(base.weight.data, state.lora_A, state.lora_B, state.scaling,
                                           self.fan_in_fan_out)
            state.pending = False
            state.magnitude = None
            config, state.config = state.config, None
            # this layer is done: drop it from its injection's journal; the last one closes the progress bar
            inj = config.__dict__.get("_peft_ext_injection") if config is not None else None
            if inj is not None:
                inj.entries = [e for e in inj.entries if e[0] is not self]
                if not inj.entries:
                    inj.close()
                    config.__dict__.pop("_peft_ext_injection", None)
                    config._injection_finished()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(s.pending for s in getattr(self, "_peft_ext_state", {}).values()):
            self._commit()
        return super().forward(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._commit()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for buffers in (getattr(self, "lora_init_A", {}), getattr(self, "lora_init_B", {})):
            if adapter_name in buffers:
                del buffers[adapter_name]
        getattr(self, "_peft_ext_state", {}).pop(adapter_name, None)

    def __repr__(self) -> str:
        return "peft_ext." + super().__repr__()


class PeftExtLinear(ResidualInitMixin, LoraLinear):
    """peft's `lora.Linear` (nn.Linear and GPT-2's Conv1D) with residual initialisation."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        # peft's default dispatcher sets fan_in_fan_out for Conv1D (weights stored (in, out)); the custom-module
        # dispatcher that brings us here does not, so do the same here
        is_conv1d = isinstance(_base_of(base_layer), Conv1D)
        config.fan_in_fan_out = is_conv1d
        super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs)


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def create_peft_ext_layer(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module:
    """peft's custom-module dispatch for every target of a peft_ext config: the layer class for its base type, or a
    clear error (after rolling back the layers already created) for types that cannot be decomposed."""
    base = _base_of(target)
    if type(base).__module__.startswith("bitsandbytes"):
        from .quantization import bnb_layer_class

        cls = bnb_layer_class(base)
        if cls is not None:
            return cls(target, adapter_name, config=config, **kwargs)
    elif isinstance(base, (nn.Linear, Conv1D)):
        return PeftExtLinear(target, adapter_name, config=config, **kwargs)
    rollback_injection(config)
    raise ValueError(
        f"peft_ext {config.peft_ext_method}: target_modules matched layer '{kwargs.get('target_name') or '<unnamed>'}' "
        f"of type {type(base).__name__}, which cannot be decomposed; only torch.nn.Linear, transformers' Conv1D and "
        f"bitsandbytes' Linear8bitLt/Linear4bit can. Fix: narrow target_modules (e.g. 'all-linear' or a list of "
        f"projection names)."
    )
