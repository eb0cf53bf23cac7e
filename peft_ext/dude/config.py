"""DuDe (arXiv 2505.14367): DoRA whose direction starts from the principal singular subspace of each weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftExtConfig, override_field
from ..linalg import top_r_svd
from ..rank_budget import energy_shares


@dataclass
class DuDeConfig(PeftExtConfig):
    """Configuration of a DuDe adapter.

    Each target weight W (out × in) is split into a magnitude m = ‖W‖ per output row (trainable, float32) and a
    direction whose low-rank factors come from the top-r SVD W ≈ U_r S_r V_rᵀ, scaled by s = lora_alpha / r as peft's
    PiSSA does:

        B = U_r · sqrt(S_r / s),   A = sqrt(S_r / s) · V_rᵀ,   frozen base weight = W − s·B·A.

    The forward and merge are DoRA's (`use_dora=True` is required). Everything else is `LoraConfig`: `r`,
    `lora_alpha`, `target_modules`, `rank_pattern`, `alpha_pattern`, `use_rslora`, `lora_dropout`, `modules_to_save`.

    Example:
        >>> from peft import get_peft_model
        >>> from peft_ext import DuDeConfig
        >>> model = get_peft_model(model, DuDeConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    """

    use_dora: bool = override_field(
        default=True,
        metadata={"help": "DuDe is DoRA-based: always True (a trainable float32 magnitude per output row)."},
        inherit="use_dora",
    )

    _method: ClassVar[str] = "dude"

    def __post_init__(self):
        if not self.use_dora:
            raise ValueError(
                "DuDeConfig: use_dora=False, but DuDe trains a DoRA magnitude over its SVD direction. Fix: leave "
                "use_dora=True (for an SVD-initialised LoRA without magnitude use LoraConfig(init_lora_weights="
                "'pissa'))."
            )
        super().__post_init__()

    def compute_init_factors(
        self, layer: nn.Module, weight: torch.Tensor, *, r: int, scaling: float, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U, S, Vh = top_r_svd(weight, r, niter=self.svd_niter, oversample=self.svd_oversample, seed=self.svd_seed)
        root = (S / scaling).sqrt()
        return root.unsqueeze(1) * Vh, U * root, energy_shares(S, weight.double().square().sum())
