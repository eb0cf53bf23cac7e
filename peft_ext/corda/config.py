"""CorDA (arXiv 2406.05223, NeurIPS 2024): context-oriented decomposition adaptation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
from torch import nn

from ..config import PeftExtConfig
from .calibration_data import CalibrationData, field_for_config
from .decomposition import decompose_member


DECOMPOSITION_FIELDS = ("corda_method", "corda_damping", "corda_balance_factors", "svd_niter", "svd_oversample",
                        "svd_seed", "float_weights_path")


@dataclass
class CorDAConfig(PeftExtConfig):
    """Configuration of a CorDA adapter. Either name the calibration data in it (`calibration_data`), and
    `get_peft_model(model, config)` calibrates the model it is given (so does any TRL trainer given
    `peft_config=config`), or call `peft_ext.calibrate(model, config, data)` first, then `get_peft_model`.

    Each target weight W is decomposed through the covariance C of its input on calibration data:
    SVD(W·C) = U S Vᵀ, W = U S Vᵀ C⁻¹. The other components form the frozen residual base weight, so the model's
    outputs are unchanged at init. The adapter is an ordinary peft LoRA (or DoRA with `use_dora=True`, a magnitude
    over the context-oriented direction).

    * `corda_method="kpm"` (knowledge-preserved; calibrate on QA data of the knowledge to keep) puts the r *smallest*
      components in the adapter and, **unlike the paper and peft's CorDA, trains only their B factors: A stays
      frozen** (`corda_train_A=None` resolves to False for KPM). A frozen A keeps the update in the input directions
      the knowledge data excites least; trained, A's own move carries most of the update and points wherever the
      task's inputs point. Measured on SmolLM2-135M (docs/corda.md): the shipped KPM recipe raises held-out NQ
      gold-answer NLL by +0.05 with A frozen against +0.36 with A trained and +0.65 for LoRA, at the same task gain.
      `corda_train_A=True` gives the paper's KPM.
    * `corda_method="ipm"` (instruction-previewed; calibrate on the task's data) trains the r *largest* components,
      both factors.

    Example:
        >>> config = CorDAConfig(r=16, lora_alpha=16, target_modules="all-linear", corda_method="kpm",
        ...                      calibration_data=CalibrationData("nq_open.jsonl", num_samples=256))
        >>> model = get_peft_model(model, config)  # calibrates on `model`, with its checkpoint's tokenizer
    """

    corda_method: Literal["kpm", "ipm"] = field(
        default="ipm",
        metadata={
            "help": (
                "'kpm' (knowledge-preserved: the r smallest components, B trained and A frozen by default (see "
                "corda_train_A), calibrate on QA data to preserve) or 'ipm' (instruction-previewed: the r largest, "
                "both factors trained, calibrate on the task's data)."
            )
        },
    )
    corda_damping: float = field(
        default=0.01,
        metadata={"help": "C + λI with λ = corda_damping · mean(diag C) before the decomposition (peft uses 0.01)."},
    )
    corda_balance_factors: bool = field(
        default=True,
        metadata={
            "help": (
                "Rescale each trained component so that its two factors have equal norms, ‖b_i‖ = ‖a_i‖ (the product, "
                "the residual and the outputs at init are unchanged). False: B = U·sqrt(S/s), A = sqrt(S/s)·Vᵀ·C⁻¹, "
                "whose ‖a_i‖/‖b_i‖ = ‖C⁻¹v_i‖ follows the covariance's scale and differs by orders of magnitude "
                "between layers, so one Adam learning rate moves them very unevenly."
            )
        },
    )
    corda_train_A: Optional[bool] = field(
        default=None,
        metadata={
            "help": (
                "Whether the A factors (each adapter's input side) train. None: the method's default, fixed when the "
                "config is built and saved with it: False for KPM, True for IPM. False: A stays at its init and only "
                "B (and a DoRA magnitude) trains, so a KPM update reads only the input directions its calibration "
                "data excites least; trained, A's move carries most of the update's output energy on the knowledge "
                "data (docs/corda.md, 'KPM as it ships'). peft keeps A frozen through set_adapter, "
                "set_requires_grad and loading with is_trainable=True. An export to plain peft trains A again."
            )
        },
    )
    corda_calibration: Optional[dict] = field(
        default=None,
        metadata={"help": "Set by peft_ext.calibrate: tokens, samples and fingerprints of the calibration, and the "
                          "digest of each sample it used (`sample_digests`, see peft_ext.sample_digest)."},
    )

    calibration_data: Optional[CalibrationData] = field_for_config()

    _method: ClassVar[str] = "corda"

    def __post_init__(self):
        super().__post_init__()
        self.calibration_data = CalibrationData.coerce(self.calibration_data)
        if self.corda_method not in ("kpm", "ipm"):
            raise ValueError(f"CorDAConfig: corda_method={self.corda_method!r}. Fix: 'kpm' or 'ipm'.")
        if self.corda_train_A is None:
            self.corda_train_A = self.corda_method != "kpm"
        if not isinstance(self.corda_train_A, bool):
            raise ValueError(f"CorDAConfig: corda_train_A={self.corda_train_A!r}. Fix: True, False, or None (the "
                             f"method's default: False for KPM, True for IPM).")
        if not self.corda_damping > 0:
            raise ValueError(f"CorDAConfig: corda_damping={self.corda_damping!r}. Fix: a positive number, e.g. 0.01.")
        if self.corda_method == "kpm" and self.svd_niter is not None:
            raise ValueError(
                f"CorDAConfig: svd_niter={self.svd_niter} with corda_method='kpm'. A randomized SVD finds the largest "
                f"components, KPM trains the smallest. Fix: svd_niter=None (exact SVD) for KPM."
            )

    def to_dict(self) -> dict:
        """peft's dict (what save_pretrained writes), with `calibration_data` as its record: the data named by path
        or Hub id, or described (peft's dataclass conversion would deep-copy the samples themselves)."""
        spec, self.calibration_data = self.calibration_data, None
        try:
            rv = super().to_dict()
        finally:
            self.calibration_data = spec
        rv["calibration_data"] = None if spec is None else spec.to_record()
        return rv

    def compute_init_factors(
        self, layer: nn.Module, weight: torch.Tensor, *, r: int, scaling: float, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calib = self.peft_ext_runtime.calibration
        if calib is None:
            raise ValueError(
                f"peft_ext corda: no calibration for layer '{name}'. Fix: name the data in the config "
                f"(CorDAConfig(..., calibration_data=...)), or call peft_ext.calibrate(model, config, data, "
                f"tokenizer=...) with this config before get_peft_model (it is consumed by get_peft_model)."
            )
        group = calib.group(name)
        if group is None:
            raise ValueError(
                f"peft_ext corda: layer '{name}' was not calibrated (the calibration covers {len(calib.targets)} other "
                f"layers). Fix: calibrate with the same target_modules that get_peft_model uses."
            )
        ready = calib.factors.get(name)
        if ready is not None:  # decomposed block by block during the calibration
            return self._checked_ready_factors(name, ready, r, scaling, calib.settings)
        return decompose_member(group, weight, r=r, scaling=scaling, settings=self.decomposition_settings(),
                                name=name)

    def keeps_largest_components(self) -> bool:
        return self.corda_method == "ipm"

    def frozen_adapter_weights(self) -> tuple[str, ...]:
        return () if self.corda_train_A else ("lora_A",)

    def decomposition_settings(self) -> dict:
        """The fields the decomposition depends on (besides each layer's r and scaling)."""
        return {k: getattr(self, k) for k in DECOMPOSITION_FIELDS}

    def init_factors_ready(self, name: str) -> bool:
        calib = self.peft_ext_runtime.calibration
        return calib is not None and name in calib.factors

    def _checked_ready_factors(self, name: str, ready: tuple, r: int, scaling: float, settings: dict):
        """Factors computed during a block-by-block calibration, refused when the config changed since."""
        changed = {k: (v, getattr(self, k)) for k, v in settings.items() if getattr(self, k) != v}
        if ready[2] != r:
            changed["r (this layer)"] = (ready[2], r)
        if abs(ready[3] - scaling) > 1e-12 * abs(scaling):
            changed["lora_alpha scaling (this layer)"] = (ready[3], scaling)
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"peft_ext corda: layer '{name}' was decomposed during a block-by-block calibration, and the config "
                f"changed since ({what}). Fix: call peft_ext.calibrate again with the final config (with a cache_file "
                f"the covariances are not recomputed), or calibrate(..., sequential=False) to decompose in "
                f"get_peft_model."
            )
        return ready[0].clone(), ready[1].clone(), ready[4].clone()

    def _injection_finished(self) -> None:
        super()._injection_finished()
        self.peft_ext_runtime.calibration = None  # consumed: free the covariances
