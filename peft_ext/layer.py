"""peft's LoRA layer, initialised from a decomposition of the base weight, whose base weight becomes the residual.

Both methods of this package share this layer: a method computes init factors (A0, B0) from the base weight W; the
trainable `lora_A`/`lora_B` start at A0/B0 and the frozen base weight becomes W − s·B0·A0, so that the layer's output
is unchanged at init. A0/B0 are kept as buffers (`lora_init_A`, `lora_init_B`) that peft saves with the adapter: they
are what rebuilds the residual on reload (`peft_ext.load_adapter`) and what turns the adapter into a plain peft one
(`peft_ext.export_peft_adapter`). With `use_dora=True` the variant is `peft_ext.variants.PeftExtDoraVariant`.

The base weight is rewritten only when the whole injection succeeded (see `peft_ext.injection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ._compat import BufferDict, Conv1D, LoraLinear, gather_params_ctx, register_frozen_peft_weight
from .base_weight import (decomposable_weight, rebase_residual_, same_weight, weight_fingerprint,
                          write_residual_)
from .distributed import broadcast_, dist_info
from .injection import Injection
from .sharded_init import decompose_deferred, shards_decomposition
from . import rank_budget
from .targets import check_rank_fits, target_shape
from .variants import PeftExtDoraVariant


# the saved `init_lora_weights`: plain peft refuses it ("Unknown initialization init_lora_weights=...") and so shows
# the user this text; adapters saved before it say "peft_ext" (LEGACY_PEFT_EXT_INIT), which still loads
PEFT_EXT_INIT = ("peft_ext: not loadable by plain peft. Load it with peft_ext.load_adapter(base_model, path), or "
                 "export a plain peft adapter with peft_ext.export_peft_adapter(path, out_dir)")
LEGACY_PEFT_EXT_INIT = "peft_ext"


@dataclass
class _InitState:
    """What a layer knows about its residual-init adapter."""

    lora_A: torch.Tensor  # A0, (r, in), float32
    lora_B: torch.Tensor  # B0, (out, r), float32
    magnitude: Optional[torch.Tensor]  # row norms of the original weight, (out,), float32; dropped at commit
    scaling: float
    config: Any = None  # the config of the injection that created it, until commit
    pending: bool = True  # base weight not yet replaced by the residual
    creating: bool = True  # inside peft's update_layer: its set_adapter call is not the end of the injection
    float_source: Optional[tuple] = None  # (checkpoint, layer name, shape): quantized base decomposed from its float weight
    name: str = "<unnamed>"  # the layer's name in the model, for messages
    method: str = ""  # the peft_ext method that created it, for messages (the config is dropped at commit)
    fingerprint: Optional[torch.Tensor] = None  # of the original base weight (`base_weight.weight_fingerprint`)
    check_base: bool = True  # refuse a state dict whose fingerprint is another base weight's
    applied: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (A0, B0) the residual holds, once committed
    deferred: bool = False  # factors not computed yet: a sharded decomposition fills them at commit
    spectrum: Optional[torch.Tensor] = None  # energy share of each component (rank_budget), until the allocation
    twin_of: Optional[str] = None  # the adapter whose residual and init factors it shares (see `_twin_state`)


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

    def residual_init_states(self) -> dict[str, _InitState]:
        """adapter name -> its init state (empty for a layer that never held a residual-init adapter)."""
        return self.__dict__.get("_peft_ext_state", {})

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        created = "_peft_ext_state" not in self.__dict__
        if created:
            self._peft_ext_state: dict[str, _InitState] = {}
            self.lora_init_A = BufferDict(persistent=True)
            self.lora_init_B = BufferDict(persistent=True)
            self.lora_init_fingerprint = BufferDict(persistent=True)
            self.register_load_state_dict_post_hook(ResidualInitMixin._after_state_load)
        if getattr(config, "peft_ext_method", None) is None:  # a plain LoraConfig added to this layer
            return super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

        existed = adapter_name in self.lora_A or adapter_name in self._peft_ext_state  # never undone by this call
        if rank_budget.pending(config):  # created at its provisional rank, shrunk at the first commit
            r = rank_budget.provisional_rank(config, r, *target_shape(self.get_base_layer()))
            lora_alpha = rank_budget.alpha_for(config, r)
        try:
            state = self._prepare(adapter_name, r, lora_alpha, config, kwargs.get("target_name") or "<unnamed>")
            self._peft_ext_state[adapter_name] = state
            super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
            for weight_name in config.frozen_adapter_weights():
                register_frozen_peft_weight(self, adapter_name, weight_name)
            state.creating = False
            self.lora_init_A[adapter_name] = state.lora_A
            self.lora_init_B[adapter_name] = state.lora_B
            self.lora_init_fingerprint[adapter_name] = state.fingerprint.clone()
        except BaseException:
            if not existed:  # remove only what this call added; an adapter of the same name from before stays intact
                self._peft_ext_state.pop(adapter_name, None)
                if not created and adapter_name in self.lora_A:
                    self.delete_adapter(adapter_name)
            config.peft_ext_runtime.abort()
            raise
        state.config = config
        runtime = config.peft_ext_runtime
        if runtime.injection is None:
            runtime.injection = Injection(config.peft_ext_method, total=runtime.expected_layers)
        runtime.injection.add(self, adapter_name, created)

    def drop_residual_init_state(self, adapter_name: str) -> None:
        self.residual_init_states().pop(adapter_name, None)

    def _prepare(self, adapter_name: str, r: int, lora_alpha: float, config, name: str) -> _InitState:
        """Validate this target and compute its init factors; the base weight is not modified."""
        method = config.peft_ext_method
        if adapter_name in self.residual_init_states():
            raise ValueError(
                f"peft_ext {method}: layer '{name}' already holds the residual-init adapter '{adapter_name}'; a new "
                f"one of that name would rewrite its base weight. Fix: merge_and_unload() or unload() the model "
                f"first, or add the adapter under another name (model.add_adapter(name, config))."
            )
        if self.residual_init_states():
            return self._twin_state(r, lora_alpha, config, name)
        base = self.get_base_layer()
        with gather_params_ctx(base.weight):
            W, float_source = decomposable_weight(base, self.fan_in_fan_out, name=name, method=method,
                                                  float_weights_path=config.float_weights_path)
            out_features, in_features = W.shape
            check_rank_fits(method, r, out_features, in_features, name)
            if not torch.isfinite(W.sum()):  # a NaN or Inf anywhere makes the sum non-finite; no out×in mask
                raise ValueError(
                    f"peft_ext {method}: layer '{name}' has NaN or Inf in its base weight; it cannot be decomposed. "
                    f"Fix: check the checkpoint, or leave this layer out of target_modules."
                )
            scaling = adapter_scaling(config, r, lora_alpha)
            fingerprint = weight_fingerprint(W)
            check_stored_base(config, name, fingerprint)
            deferred = shards_decomposition(config, name)
            if deferred:  # filled at commit by `sharded_init.decompose_deferred`, each rank computing its share
                lora_A = torch.zeros(r, in_features, device=W.device)
                lora_B = torch.zeros(out_features, r, device=W.device)
                spectrum = torch.zeros(r, device=W.device)
            else:
                lora_A, lora_B, spectrum = self._init_factors(config, W, r, scaling, name)
            magnitude = torch.linalg.vector_norm(W, dim=1)
        if hasattr(base.weight, "ds_id") and dist_info()[1] > 1:
            # ZeRO-3: every rank read the same gathered weight; make the result identical by construction
            for t in (magnitude,) if deferred else (lora_A, lora_B, magnitude, spectrum):
                if t is not None:
                    broadcast_(t, src=0)
        return _InitState(lora_A, lora_B, magnitude, scaling, float_source=float_source, name=name, method=method,
                          fingerprint=fingerprint, check_base=config.peft_ext_runtime.check_base, deferred=deferred,
                          spectrum=spectrum)

    def _twin_state(self, r: int, lora_alpha: float, config, name: str) -> _InitState:
        """A second residual-init adapter on this layer: it shares the first one's residual and starts from its init
        factors (A0, B0), which is what a fresh decomposition of the same weight gives for the same method, rank and
        scaling. TRL's DPO and GRPO create such a copy ('ref') of a trained adapter as their reference model."""
        (source_name, source), method = next(iter(self.residual_init_states().items())), config.peft_ext_method
        scaling = adapter_scaling(config, r, lora_alpha)
        same = (source.applied is not None and source.method == method and source.applied[0].shape[0] == r
                and abs(source.scaling - scaling) <= 1e-12 * abs(scaling))
        stored = (config.peft_ext_runtime.stored_init or {}).get(name)
        if same and stored is not None:  # a reload: its saved init must be the one the residual holds
            same = all(torch.equal(t.float().cpu(), a.cpu()) for t, a in zip(stored[:2], source.applied))
        if not same:
            raise ValueError(
                f"peft_ext {method}: layer '{name}' already holds the residual-init adapter '{source_name}' "
                f"({source.method}, rank {source.lora_A.shape[0]}, scaling {source.scaling:g}). A second one shares "
                f"its residual, so it needs the same method, rank, scaling and init factors (as TRL's reference copy "
                f"'ref' has). Fix: add it with the first adapter's config, merge_and_unload() or unload() first, or "
                f"add a plain LoraConfig adapter instead."
            )
        A, B = (t.detach().clone() for t in source.applied)
        with gather_params_ctx(self.get_base_layer().weight):
            W, float_source = decomposable_weight(self.get_base_layer(), self.fan_in_fan_out, name=name, method=method,
                                                  float_weights_path=config.float_weights_path)
        if float_source is None:  # the residual: the original weight is W_res + s·B0·A0
            W = W + source.scaling * (B.to(W.device) @ A.to(W.device))
        return _InitState(A, B, torch.linalg.vector_norm(W, dim=1), scaling, float_source=source.float_source,
                          name=name, method=method, fingerprint=source.fingerprint.clone(),
                          check_base=source.check_base, twin_of=source_name)

    def decompose(self, state: _InitState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A0, B0, energy shares) of a deferred adapter: its weight read again (gathered by the caller under ZeRO-3)
        and the method's decomposition."""
        W, _ = decomposable_weight(self.get_base_layer(), self.fan_in_fan_out, name=state.name, method=state.method,
                                   float_weights_path=state.config.float_weights_path)
        return self._init_factors(state.config, W, state.lora_A.shape[0], state.scaling, state.name)

    @torch.no_grad()
    def fill_factors(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     spectrum: torch.Tensor) -> None:
        """A deferred adapter receives its factors: the init state, the init buffers and the trainable factors
        (unless they are still empty meta parameters, which `_materialize` fills at commit)."""
        state = self.residual_init_states()[adapter_name]
        state.lora_A.copy_(lora_A)
        state.lora_B.copy_(lora_B)
        state.spectrum.copy_(spectrum)
        state.deferred = False
        targets = [self.lora_init_A[adapter_name], self.lora_init_B[adapter_name],
                   self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]
        for target, value in zip(targets, (lora_A, lora_B) * 2):
            if not target.is_meta:
                target.copy_(value)

    def _init_factors(self, config, W: torch.Tensor, r: int, scaling: float, name: str):
        """(A0, B0, energy shares), contiguous float32: the saved ones when the adapter is being reloaded (no
        shares: a saved adapter's ranks are settled), else the method's."""
        method, (out_features, in_features) = config.peft_ext_method, W.shape
        stored = (config.peft_ext_runtime.stored_init or {}).get(name)
        if stored is not None:
            lora_A, lora_B = (t.to(device=W.device, dtype=torch.float32) for t in stored[:2])
            if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
                raise ValueError(
                    f"peft_ext {method}: the saved init factors of layer '{name}' have shapes "
                    f"{tuple(lora_A.shape)}/{tuple(lora_B.shape)}, but the model needs ({r}, {in_features})/"
                    f"({out_features}, {r}). Fix: load the adapter onto the base model it was trained from."
                )
            spectrum = None
        else:
            lora_A, lora_B, spectrum = config.compute_init_factors(self, W, r=r, scaling=scaling, name=name)
        if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
            raise ValueError(
                f"peft_ext {method}: the decomposition of layer '{name}' produced NaN/Inf factors. "
                f"Fix: check the base weight (and the calibration data for CorDA)."
            )
        return lora_A.contiguous(), lora_B.contiguous(), spectrum

    @torch.no_grad()
    def keep_components(self, adapter_name: str, r: int, *, last: bool, lora_alpha: float) -> None:
        """Shrink a created, uncommitted adapter to r of its components (the first r, or the `last` r): the init
        state and buffers, peft's trainable factors (new modules, on the meta device if they were there) and its
        rank and alpha; the scaling is unchanged (`rank_budget.alpha_for`). Nothing was written to the base weight."""
        state = self.residual_init_states()[adapter_name]
        old = state.lora_A.shape[0]
        keep = slice(old - r, old) if last else slice(0, r)
        state.lora_A, state.lora_B = state.lora_A[keep].contiguous(), state.lora_B[:, keep].contiguous()
        state.spectrum = None
        self.lora_init_A[adapter_name], self.lora_init_B[adapter_name] = state.lora_A, state.lora_B
        for modules, value in ((self.lora_A, state.lora_A), (self.lora_B, state.lora_B)):
            weight = modules[adapter_name].weight
            new = nn.Linear(value.shape[1], value.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            if not weight.is_meta:
                new.weight.copy_(value)
            new.weight.requires_grad_(weight.requires_grad)
            modules[adapter_name] = new
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self._freeze_non_trainable_peft_weights(adapter_name)  # a frozen A stays frozen in its new module

    def reset_lora_parameters(self, adapter_name, init_lora_weights):
        state = self.residual_init_states().get(adapter_name)
        if init_lora_weights == PEFT_EXT_INIT and state is not None:
            for module, value in ((self.lora_A[adapter_name], state.lora_A), (self.lora_B[adapter_name], state.lora_B)):
                if not module.weight.is_meta:  # low_cpu_mem_usage: created empty, filled at commit (_materialize)
                    module.weight.data = value.clone()
            return
        super().reset_lora_parameters(adapter_name, init_lora_weights)

    # --- commit ---------------------------------------------------------------------------------------------------

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        # peft activates the adapter once more after it created every layer: that is the end of the injection
        self._commit()

    def _commit(self) -> None:
        """Replace the base weight by the residual for every pending adapter of this layer whose creation finished."""
        for adapter_name, state in self.residual_init_states().items():
            if not state.pending or state.creating:
                continue
            if state.deferred:  # the first commit of a sharded injection decomposes every layer of it
                decompose_deferred(state.config.peft_ext_runtime, state.method)
            if rank_budget.pending(state.config):  # the first commit of a budgeted injection shrinks every layer
                self._allocate(state.config)
            self._materialize(adapter_name, state)
            if state.twin_of is None:  # a twin's residual is there already: its source's
                write_residual_(self.get_base_layer(), state.lora_A, state.lora_B, state.scaling,
                                self.fan_in_fan_out, float_source=state.float_source, method=state.method)
            state.applied = (state.lora_A.detach().clone(), state.lora_B.detach().clone())
            state.pending = False
            state.magnitude = None
            config, state.config = state.config, None
            runtime = getattr(config, "peft_ext_runtime", None)
            if runtime is not None and runtime.injection is not None and runtime.injection.commit(self):
                runtime.injection = None  # this was the injection's last layer
                config._injection_finished()

    @staticmethod
    def _allocate(config) -> None:
        """`rank_budget.allocate_injection`, the injection rolled back on any error."""
        try:
            rank_budget.allocate_injection(config.peft_ext_runtime, config)
        except BaseException:
            config.peft_ext_runtime.abort()
            raise

    def _materialize(self, adapter_name: str, state: _InitState) -> None:
        """`get_peft_model(..., low_cpu_mem_usage=True)` creates the adapter's parameters on the meta device (peft
        expects a state dict to fill them). A residual-init adapter's values are its init factors and magnitude,
        computed anyway: they are swapped into those parameters here (a parameter assigned while peft's empty-weights
        context is active would be sent to the meta device as well)."""
        magnitude = self.lora_magnitude_vector[adapter_name] if adapter_name in self.lora_magnitude_vector else None
        values = [(self.lora_A[adapter_name].weight, state.lora_A), (self.lora_B[adapter_name].weight, state.lora_B)]
        if magnitude is not None:
            values.append((magnitude.weight, state.magnitude))
        for param, value in values:
            if param.is_meta:
                torch.utils.swap_tensors(param, nn.Parameter(value.detach().to(param.dtype).clone(),
                                                             requires_grad=param.requires_grad))

    # --- the original weight where the residual-init adapter is not applied ---------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(s.pending and not s.creating for s in self.residual_init_states().values()):
            self._commit()
        result = super().forward(x, *args, **kwargs)
        # the base layer computes the residual; wherever no residual-init adapter is applied (adapters disabled, as
        # TRL's implicit reference model; another adapter active; rows of a mixed batch that ask for another adapter
        # or '__base__'), add the init product s·B0·(A0·x) back, so that those outputs are the original W·x. Twins
        # share one residual and one init: it is added once, and not where any of them is applied or merged.
        group = {n: s for n, s in self.residual_init_states().items() if s.applied is not None}
        if not group or (not self.disable_adapters and any(n in self.merged_adapters for n in group)):
            return result
        state, names = next(iter(group.values())), None if self.disable_adapters else kwargs.get("adapter_names")
        if names is not None:
            rows = torch.tensor([n not in group for n in names], device=result.device)
            if rows.any():
                result = result + self._init_product(x, state, result.dtype) * rows.view(-1, *[1] * (x.dim() - 1))
            return result
        applied = [] if self.disable_adapters else [n for n in self.active_adapters if n in group]
        if len(applied) > 1:
            raise ValueError(
                f"peft_ext: layer '{state.name}' has the residual-init adapters {applied} active at once; they share "
                f"one residual, so their sum is no model. Fix: activate one of them (set_adapter)."
            )
        return result if applied else result + self._init_product(x, state, result.dtype)

    @staticmethod
    def _init_product(x: torch.Tensor, state: _InitState, dtype: torch.dtype) -> torch.Tensor:
        if state.applied[0].device != x.device:  # the model moved (e.g. to the GPU after init): follow it once
            state.applied = tuple(t.to(x.device) for t in state.applied)
        A, B = state.applied
        return (state.scaling * ((x.to(torch.float32) @ A.T) @ B.T)).to(dtype)

    def _restore_base(self, adapter_name: str) -> None:
        """Write the original weight back (W_res + s·B0·A0) and forget the adapter's residual-init state; while a twin
        still uses the residual, only forget the state (the twin then owns the residual)."""
        state = self.residual_init_states().pop(adapter_name, None)
        if state is not None and state.applied is not None and not self.residual_init_states():
            rebase_residual_(self.get_base_layer(), state.applied, None, state.scaling, self.fan_in_fan_out,
                             float_source=state.float_source, method=state.method)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """peft's `merge_and_unload()` / `unload()`: the base layer with the merged adapters' deltas on the original
        weight (`merge=True`), or the original weight itself (`unload()`)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        elif self.merged:
            self.unmerge()
        states = self.residual_init_states()
        if any(n in self.merged_adapters for n in states):  # a merged one's delta sits on the original W already
            states.clear()
        for adapter_name in list(states):  # twins: the last one restores the original weight, once
            self._restore_base(adapter_name)
        return self.get_base_layer()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._commit()
        asked = self.active_adapters if adapter_names is None else adapter_names
        twins = sorted({n for n in [*asked, *self.merged_adapters] if n in self.residual_init_states()})
        if len(twins) > 1:
            raise ValueError(
                f"peft_ext: merging {twins} into layer '{self.residual_init_states()[twins[0]].name}': these "
                f"residual-init adapters share one residual, so only one of them can be merged. Fix: merge one, or "
                f"delete_adapter the others first."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.merged_adapters:  # the original weight comes back with the adapter's removal
            self._restore_base(adapter_name)
        super().delete_adapter(adapter_name)
        for buffers in (getattr(self, name, {}) for name in ("lora_init_A", "lora_init_B", "lora_init_fingerprint")):
            if adapter_name in buffers:
                del buffers[adapter_name]
        self.drop_residual_init_state(adapter_name)

    # --- state dict loads (peft's load_adapter, set_peft_model_state_dict, a Trainer resume) ----------------------

    def _after_state_load(self, incompatible_keys) -> None:
        """The residual follows the loaded init factors: when a load wrote other A0/B0 than the residual was built
        from (another svd_seed, other calibration data), it is rebuilt from the original weight and the loaded
        factors. A saved fingerprint of another base weight is refused (unless the adapter was created with
        `check_base=False`); the layer keeps its own fingerprint either way."""
        for adapter_name, state in self.residual_init_states().items():
            if state.applied is None or adapter_name not in self.lora_init_A:
                continue
            A, B = self.lora_init_A[adapter_name], self.lora_init_B[adapter_name]
            fingerprint = self.lora_init_fingerprint[adapter_name]
            foreign = state.check_base and not same_weight(fingerprint.cpu(), state.fingerprint)
            fingerprint.copy_(state.fingerprint)
            if foreign:
                A.copy_(state.applied[0])
                B.copy_(state.applied[1])
                raise ValueError(base_mismatch_message(state.name, "the loaded state dict"))
            old_A, old_B = (t.to(A.device, A.dtype) for t in state.applied)
            if torch.equal(A, old_A) and torch.equal(B, old_B):
                continue
            if adapter_name in self.merged_adapters:
                raise ValueError(
                    f"peft_ext: the state dict loaded into layer '{state.name}' has other init factors than adapter "
                    f"'{adapter_name}', which is merged. Fix: unmerge_adapter() before loading."
                )
            if len(self.residual_init_states()) > 1:
                raise ValueError(
                    f"peft_ext: the state dict loaded into layer '{state.name}' has other init factors than adapter "
                    f"'{adapter_name}', whose residual another adapter of this layer shares. Fix: load it onto a model "
                    f"without that adapter (delete_adapter), or load the adapter with its own init."
                )
            new = (A.detach().float().clone(), B.detach().float().clone())
            rebase_residual_(self.get_base_layer(), state.applied, new, state.scaling, self.fan_in_fan_out,
                             float_source=state.float_source, method=state.method)
            state.applied = new

    def __repr__(self) -> str:
        return "peft_ext." + super().__repr__()


class PeftExtLinear(ResidualInitMixin, LoraLinear):
    """peft's `lora.Linear` (nn.Linear and GPT-2's Conv1D) with residual initialisation."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        # peft's default dispatcher sets fan_in_fan_out for Conv1D (weights stored (in, out)); the custom-module
        # dispatcher that brings us here does not, so do the same here
        is_conv1d = isinstance(base_of(base_layer), Conv1D)
        config.fan_in_fan_out = is_conv1d
        super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs)


def adapter_scaling(config, r: int, lora_alpha: float) -> float:
    """peft's LoRA scaling of an adapter of rank r: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    return lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r


def base_mismatch_message(name: str, source: str) -> str:
    return (f"peft_ext: layer '{name}' of this model is not the base weight the adapter in {source} was created on "
            f"(their fingerprints differ). Fix: load the adapter onto the base model it was trained from, or pass "
            f"check_base=False to peft_ext.load_adapter for a deliberate transfer.")


def check_stored_base(config, name: str, fingerprint: torch.Tensor) -> None:
    """A reload (`load_adapter`) onto another base weight than the saved one is refused before anything changes."""
    runtime = config.peft_ext_runtime
    stored = (runtime.stored_init or {}).get(name)
    if runtime.check_base and stored is not None and stored[2] is not None and not same_weight(stored[2], fingerprint):
        raise ValueError(base_mismatch_message(name, runtime.source or "the saved adapter"))


def base_of(module: nn.Module) -> nn.Module:
    """The innermost base layer of a (possibly already wrapped) target."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module
