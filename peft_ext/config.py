"""`PeftExtConfig`, the part of the configs both methods share (a `LoraConfig` whose layers are peft_ext's
residual-init layers), the registry of methods, `load_config`, and a config's run-time state."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from peft import LoraConfig
from torch import nn

from .dispatch import create_peft_ext_layer
from .layer import LEGACY_PEFT_EXT_INIT, PEFT_EXT_INIT
from .model_card import add_to_model_card
from .rank_budget import RANK_ALLOCATIONS


__version__ = "0.1.0"
CONFIG_NAME = "adapter_config.json"
UNMARKED_VARIANTS = ("use_qalora",)  # LoRA variants whose peft field does not carry `is_lora_variant`
_METHODS: dict[str, type] = {}  # peft_ext_method -> config class, filled by PeftExtConfig.__init_subclass__


class InitRuntime:
    """What a config carries between calls at run time, never saved (like peft's `LoraRuntimeConfig`):

    * `injection`: the `peft_ext.injection.Injection` of the `get_peft_model` call in progress;
    * `stored_init`: layer name -> saved (A0, B0, base-weight fingerprint or None), set by `load_adapter`;
    * `calibration`: CorDA's `Calibration`, set by `calibrate`, consumed by `get_peft_model`;
    * `check_base`: refuse saved factors (and state dicts) whose base-weight fingerprint is another weight's;
    * `source`: where the stored factors come from, for messages;
    * `expected_layers`: how many layers the next injection creates, when known (the init progress bar's total).

    A copy of the config (peft and TRL deep-copy configs) shares the stored factors and the calibration, which are
    read only, instead of copying covariances; an injection in progress is never copied.
    """

    __slots__ = ("injection", "stored_init", "calibration", "check_base", "source", "expected_layers")

    def __init__(self) -> None:
        self.injection: Any = None
        self.stored_init: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None
        self.calibration: Any = None
        self.check_base: bool = True
        self.source: Optional[str] = None
        self.expected_layers: Optional[int] = None

    def __deepcopy__(self, memo) -> "InitRuntime":
        copy = InitRuntime()
        copy.stored_init, copy.calibration = self.stored_init, self.calibration
        copy.check_base, copy.source, copy.expected_layers = self.check_base, self.source, self.expected_layers
        return copy

    def __copy__(self) -> "InitRuntime":
        return self.__deepcopy__({})

    def abort(self) -> None:
        """A target failed: undo the injection in progress (see `Injection.rollback`) and forget the reload."""
        if self.injection is not None:
            self.injection.rollback()
        self.injection = self.stored_init = None


def override_field(*, default, metadata: dict, inherit: str):
    """A dataclass field that overrides a `LoraConfig` field: peft reads flags such as `is_lora_variant` and
    `lora_variants` from the field metadata, so the inherited metadata is kept and only `help` is replaced."""
    return field(default=default, metadata={**LoraConfig.__dataclass_fields__[inherit].metadata, **metadata})


@dataclass
class PeftExtConfig(LoraConfig):
    """Base of `DuDeConfig` and `CorDAConfig`; not used directly.

    These configs stay LoRA-typed (`peft_type=LORA`), so `get_peft_model`, TRL and `merge_and_unload` work unchanged.
    Because peft reloads a LoRA-typed config as a plain `LoraConfig`, the saved config sets `init_lora_weights` to a
    text that names `peft_ext.load_adapter` and `peft_ext.export_peft_adapter`: plain peft then refuses to load the
    adapter ("Unknown initialization init_lora_weights='peft_ext: ...'") and shows that text, instead of silently
    building a plain LoRA over the wrong base weights. `save_pretrained` also adds both routes to the adapter's model
    card (README.md).
    """

    init_lora_weights: Union[bool, str] = override_field(
        default=PEFT_EXT_INIT,
        metadata={
            "help": (
                "Fixed: the adapter is initialised from a decomposition of the base weight. Saved as a text that "
                "tells plain peft users how to load it. For other initialisations use peft's LoraConfig."
            ),
        },
        inherit="init_lora_weights",
    )
    peft_ext_method: str = field(
        default="",
        metadata={"help": "Which peft_ext method built this adapter ('dude' or 'corda'); set by the config class."},
    )
    peft_ext_version: str = field(
        default=__version__, metadata={"help": "Version of peft_ext that created the adapter (informational)."}
    )
    svd_niter: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "None: exact SVD (torch.linalg.svd). An integer n >= 0: randomized SVD with n power iterations "
                "(much faster on large matrices; 2-4 is usually enough for the top r)."
            )
        },
    )
    svd_oversample: int = field(
        default=8,
        metadata={"help": "Randomized SVD only: extra random directions beyond r, for accuracy of the top r."},
    )
    svd_seed: int = field(
        default=0,
        metadata={"help": "Randomized SVD only: seed of its private generator (two runs give identical adapters)."},
    )
    float_weights_path: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "bitsandbytes (8-bit/4-bit) bases only: a safetensors checkpoint (a .safetensors file, or a folder "
                "with model.safetensors or a sharded index) holding the base model's float weights, usually the folder "
                "the quantized model was loaded from. The decomposition then uses the float weight and the residual "
                "is quantized once (as QPiSSA does) instead of dequantized, decomposed and quantized again. None: "
                "decompose the dequantized weight. Saved with the adapter; peft_ext.load_adapter reads the same file."
            )
        },
    )

    shard_init: bool = field(
        default=True,
        metadata={
            "help": (
                "With torch.distributed initialised (DDP, DeepSpeed ZeRO), get_peft_model splits the decompositions "
                "over the ranks, each computing about 1/world of them (balanced by cost), and broadcasts the results: "
                "identical factors on every rank in less time. Every rank must then call get_peft_model, as TRL's "
                "trainers do. False: every rank decomposes every layer on its own."
            )
        },
    )

    rank_allocation: str = field(
        default="uniform",
        metadata={
            "help": (
                "'uniform': every target gets r (or its rank_pattern entry). 'budgeted': get_peft_model gives each "
                "target its own rank from the spectrum its init decomposes (most energy per parameter for DuDe and "
                "CorDA-IPM, least context energy for CorDA-KPM), at most rank_cap·r, with the trainable parameters of "
                "uniform r; the result is saved as rank_pattern/alpha_pattern (scaling stays lora_alpha / r), so "
                "reload and export are plain peft. See peft_ext.rank_budget and docs/ranks.md."
            )
        },
    )
    rank_cap: float = field(
        default=2.0,
        metadata={"help": "rank_allocation='budgeted' only: a layer gets at most ⌊rank_cap·r⌋ (like EVA's rho), "
                          "and at most 256 so that an export (rank 2·r_l) stays servable by vLLM (512)."},
    )
    rank_allocation_summary: Optional[dict] = field(
        default=None,
        metadata={"help": "Set by get_peft_model with rank_allocation='budgeted': the budget, the parameters spent, "
                          "the energy captured against uniform r. Once set, rank_pattern is used as it is."},
    )

    peft_ext_runtime: InitRuntime = field(
        default_factory=InitRuntime, init=False, repr=False, compare=False,
        metadata={"help": "Run-time state (see InitRuntime); never saved."},
    )

    # the method name that the subclass stands for; `peft_ext_method` must equal it
    _method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_method"):
            _METHODS[cls._method] = cls

    def to_dict(self) -> dict:
        rv = super().to_dict()
        rv.pop("peft_ext_runtime", None)
        return rv

    def __post_init__(self):
        cls_name = type(self).__name__
        self._check_ranks(cls_name)  # before peft's checks: ours name the fix for these adapters
        self._check_rank_allocation(cls_name)
        self._check_lora_options(cls_name)
        super().__post_init__()
        if not self.peft_ext_method:
            self.peft_ext_method = self._method
        if self.peft_ext_method != self._method:
            raise ValueError(
                f"{cls_name}: peft_ext_method={self.peft_ext_method!r}, but this config class builds "
                f"{self._method!r} adapters. Fix: load the config with peft_ext.load_config, which picks the class."
            )
        if self.init_lora_weights == LEGACY_PEFT_EXT_INIT:  # saved before the init text named the loaders
            self.init_lora_weights = PEFT_EXT_INIT
        if self.init_lora_weights != PEFT_EXT_INIT:
            raise ValueError(
                f"{cls_name}: init_lora_weights={self.init_lora_weights!r}, but {cls_name} always initialises from "
                f"its decomposition. Fix: leave init_lora_weights unset (or use peft's LoraConfig for other inits)."
            )
        if self.svd_niter is not None and (not isinstance(self.svd_niter, int) or self.svd_niter < 0):
            raise ValueError(
                f"{cls_name}: svd_niter={self.svd_niter!r}. Fix: None for an exact SVD or an integer >= 0."
            )
        if self.svd_oversample < 0:
            raise ValueError(f"{cls_name}: svd_oversample={self.svd_oversample}. Fix: an integer >= 0.")
        for name in ("layer_replication", "target_parameters", "megatron_config", "alora_invocation_tokens"):
            if getattr(self, name, None):
                raise ValueError(
                    f"{cls_name}: {name}={getattr(self, name)!r} is not supported: these methods rewrite each "
                    f"target's base weight. Fix: unset {name}."
                )
        # every matched module goes through our dispatcher: the right layer class, or a clear error
        self._register_custom_module({nn.Module: create_peft_ext_layer})

    def _check_rank_allocation(self, cls_name: str) -> None:
        """rank_allocation and rank_cap; a budgeted config that has not allocated yet takes no patterns of its own."""
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise ValueError(f"{cls_name}: rank_allocation={self.rank_allocation!r}. Fix: one of {RANK_ALLOCATIONS}.")
        if isinstance(self.rank_cap, bool) or not isinstance(self.rank_cap, (int, float)) or not self.rank_cap >= 1:
            raise ValueError(f"{cls_name}: rank_cap={self.rank_cap!r}. Fix: a number >= 1 (a layer gets at most "
                             f"rank_cap·r; 2 as EVA's rho=2).")
        if self.rank_allocation == "budgeted" and self.rank_allocation_summary is None:
            given = [name for name in ("rank_pattern", "alpha_pattern") if getattr(self, name)]
            if given:
                raise ValueError(
                    f"{cls_name}: rank_allocation='budgeted' with {' and '.join(given)} set. The allocation writes "
                    f"both from the spectra. Fix: leave {' and '.join(given)} empty, or use rank_allocation='uniform'."
                )

    def _check_ranks(self, cls_name: str) -> None:
        """r, rank_pattern and lora_alpha: positive numbers, checked here instead of failing inside the init."""
        ranks = {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in (self.rank_pattern or {}).items()}}
        for name, value in ranks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{cls_name}: {name}={value!r}. Fix: a positive integer rank (e.g. r=16).")
        alphas = {"lora_alpha": self.lora_alpha, **{f"alpha_pattern[{k!r}]": v
                                                     for k, v in (self.alpha_pattern or {}).items()}}
        for name, value in alphas.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{cls_name}: {name}={value!r}. Fix: a positive number (the scaling is alpha / r).")

    def _check_lora_options(self, cls_name: str) -> None:
        """LoRA variants (every field peft marks `is_lora_variant`, and UNMARKED_VARIANTS, except use_dora) and
        lora_bias would be ignored by the residual-init layers, or would change the layer they rewrite: refused by
        name."""
        for f in dataclasses.fields(LoraConfig):
            if f.name == "use_dora" or not (f.metadata.get("is_lora_variant") or f.name in UNMARKED_VARIANTS):
                continue
            if getattr(self, f.name, None) not in (None, False, f.default):
                raise ValueError(
                    f"{cls_name}: {f.name}={getattr(self, f.name)!r} is a LoRA variant that peft_ext layers do not "
                    f"implement (only use_dora is). Fix: unset {f.name}, or use peft's LoraConfig for that variant."
                )
        if self.lora_bias:
            raise ValueError(
                f"{cls_name}: lora_bias=True is not supported: the residual-init layers train no bias of their own, "
                f"and the export to plain peft has none. Fix: leave lora_bias=False."
            )

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's config save, and the adapter's model card section naming `peft_ext.load_adapter` and the export."""
        super().save_pretrained(save_directory, **kwargs)
        add_to_model_card(save_directory, self.peft_ext_method)

    def compute_init_factors(
        self, layer: nn.Module, weight: torch.Tensor, *, r: int, scaling: float, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Method-specific: init factors (A0 of shape (r, in), B0 of shape (out, r), float32) for one target whose
        base weight is `weight` (out, in, float32), and the energy share of each of the r components (float32, (r,),
        see `rank_budget.energy_shares`). The residual becomes W − scaling·B0·A0."""
        raise TypeError(f"{type(self).__name__} does not define an initialisation; use DuDeConfig or CorDAConfig.")

    def keeps_largest_components(self) -> bool:
        """Whether the adapter trains its decomposition's largest components (the budgeted allocation's objective);
        its factors run from the largest component to the smallest either way."""
        return True

    def frozen_adapter_weights(self) -> tuple[str, ...]:
        """The adapter weights (peft's names, e.g. "lora_A") that stay at their init: peft keeps them frozen through
        set_adapter, set_requires_grad and loading with is_trainable=True. Nothing by default."""
        return ()

    def init_factors_ready(self, name: str) -> bool:
        """Whether layer `name`'s init factors are already computed (then no sharded decomposition is needed)."""
        return False

    def _injection_finished(self) -> None:
        """get_peft_model has committed every layer: drop what only the init needed."""
        self.peft_ext_runtime.stored_init = self.peft_ext_runtime.expected_layers = None

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build the peft_ext config class named by `peft_ext_method` (peft itself would build a plain LoraConfig)."""
        config_cls = config_class_for(kwargs.get("peft_ext_method"), where="adapter config")
        known = {f for f in config_cls.__dataclass_fields__ if config_cls.__dataclass_fields__[f].init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            warnings.warn(f"{config_cls.__name__}: ignoring unknown config keys {unknown}.")
        return config_cls(**{k: v for k, v in kwargs.items() if k in known})


def config_class_for(method: Optional[str], where: str = "config") -> type[PeftExtConfig]:
    """The config class of a peft_ext method name."""
    if method not in _METHODS:
        raise ValueError(
            f"peft_ext: {where} has peft_ext_method={method!r}; known methods are {sorted(_METHODS)}. "
            f"Fix: a directory without peft_ext_method is a plain peft adapter: load it with "
            f"peft.PeftModel.from_pretrained."
        )
    return _METHODS[method]


def load_config(path: str) -> PeftExtConfig:
    """Read the `DuDeConfig`/`CorDAConfig` saved in an adapter directory (every field kept)."""
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"peft_ext: no {CONFIG_NAME} in '{path}'. Fix: pass the directory save_pretrained wrote.")
    with open(config_file) as f:
        data = json.load(f)
    data.pop("runtime_config", None)
    if data.get("peft_ext_method") == "corda":
        data.setdefault("corda_balance_factors", False)  # saved before the option existed: unbalanced factors
        data.setdefault("corda_train_A", True)  # saved before the option existed: A trained
    config_class_for(data.get("peft_ext_method"), where=f"'{config_file}'")
    return PeftExtConfig.from_peft_type(**data)
