"""Reload a saved peft_ext adapter exactly: the residual base weights are rebuilt from the saved init factors.

A saved peft_ext adapter directory is a normal peft directory (adapter_config.json + adapter_model.safetensors) whose
state dict also holds the init factors `lora_init_A`/`lora_init_B` of every layer. Those rebuild the residual base
weight W − s·B0·A0 bit for bit, without re-running the decomposition (which, for CorDA, would also need the
calibration data).
"""

from __future__ import annotations

from typing import Optional

import torch
from peft import PeftModel
from peft.utils import load_peft_weights

from .config import load_config


_BASE_PREFIX = "base_model.model."
INIT_SUFFIXES = (".lora_init_A", ".lora_init_B", ".lora_init_fingerprint")  # A0, B0, the base weight's fingerprint


def _stored_init_factors(weights: dict[str, torch.Tensor], path: str) -> dict[str, tuple]:
    """layer name -> (A0, B0, fingerprint or None: adapters saved before fingerprints were recorded)."""
    pairs: dict[str, list[Optional[torch.Tensor]]] = {}
    for key, value in weights.items():
        for i, suffix in enumerate(INIT_SUFFIXES):
            if key.endswith(suffix):
                name = key[: -len(suffix)].removeprefix(_BASE_PREFIX)
                pairs.setdefault(name, [None, None, None])[i] = value
    if not pairs:
        raise ValueError(
            f"peft_ext: '{path}' holds no lora_init_A/lora_init_B tensors, so its residual base weights cannot be "
            f"rebuilt. Fix: save the PeftModel with save_pretrained (a trainer checkpoint of it works too)."
        )
    broken = sorted(n for n, (a, b, _) in pairs.items() if a is None or b is None)
    if broken:
        raise ValueError(f"peft_ext: '{path}' has only one of lora_init_A/lora_init_B for {broken}; the file is damaged.")
    return {n: tuple(p) for n, p in pairs.items()}


def load_adapter(
    model: torch.nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False,
    float_weights_path: Optional[str] = None, check_base: bool = True, **kwargs
) -> PeftModel:
    """Load a saved DuDe/CorDA adapter onto the original base model and return the PeftModel.

    The residual base weights are rebuilt from the saved init factors (no SVD, no calibration data), so the result
    reproduces the saved model's outputs. For a quantized base decomposed from its float checkpoint, that checkpoint is
    read again: the saved `float_weights_path`, or `float_weights_path` given here (the same weights, elsewhere).
    The adapter records a fingerprint of every target's original weight; loading onto another base model (the same
    shapes, other weights) is refused with the name of the first layer that differs, and leaves the model as it
    was. `check_base=False` allows a deliberate transfer. `kwargs` go to `peft.PeftModel.from_pretrained`.
    """
    config = load_config(path)
    if float_weights_path is not None:
        config.float_weights_path = float_weights_path
    weights = load_peft_weights(path, device="cpu")
    stored = _stored_init_factors(weights, path)
    names = {name for name, _ in model.named_modules()}
    missing = sorted(set(stored) - names)
    if missing:
        raise ValueError(
            f"peft_ext.load_adapter: the adapter in '{path}' adapts layers this model does not have, e.g. "
            f"'{missing[0]}' ({len(missing)} of {len(stored)}). Fix: load the adapter onto the base model it was "
            f"trained from (base_model_name_or_path={config.base_model_name_or_path!r})."
        )
    runtime = config.peft_ext_runtime
    runtime.stored_init, runtime.check_base, runtime.source = stored, check_base, repr(path)
    runtime.expected_layers = len(stored)
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )
