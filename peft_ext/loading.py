"""Reload a saved peft_ext adapter exactly: the residual base weights are rebuilt from the saved init factors.

A saved peft_ext adapter directory is a normal peft directory (adapter_config.json + adapter_model.safetensors) whose
state dict also holds the init factors `lora_init_A`/`lora_init_B` of every layer. Those rebuild the residual base
weight W − s·B0·A0 bit for bit, without re-running the decomposition (which, for CorDA, would also need the
calibration data).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from peft import PeftModel
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file

from .config import load_config


_BASE_PREFIX = "base_model.model."
INIT_SUFFIXES = (".lora_init_A", ".lora_init_B", ".lora_init_fingerprint")  # A0, B0, the base weight's fingerprint


def with_frozen_factors(config, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state dict with every frozen factor put back that its saver left out. Hugging Face's Trainer under
    DeepSpeed ZeRO-3 saves only the trainable parameters of a peft model, so a frozen A (`corda_train_A=False`) is
    missing from its files. A frozen A never leaves its init: it is the saved `lora_init_A`, in the dtype that
    layer's B was saved in (the dtype the factors trained in)."""
    if "lora_A" not in config.frozen_adapter_weights():
        return weights
    out = dict(weights)
    for key, init in weights.items():
        if key.endswith(".lora_init_A"):
            prefix = key[: -len(".lora_init_A")]
            B = weights.get(prefix + ".lora_B.weight")
            out.setdefault(prefix + ".lora_A.weight", init.to(init.dtype if B is None else B.dtype, copy=True))
    return out


def complete_saved_adapter(path: str) -> list[str]:
    """Write back into the adapter directory `path` the frozen factors its saver left out (see
    `with_frozen_factors`), so that its files hold the whole adapter; the names added, none when it was complete.
    trl_recipes calls it after its final save; call it after saving a frozen-A CorDA adapter with your own Trainer under
    ZeRO-3. `export_peft_adapter` reads an incomplete directory correctly, and `load_adapter` too (A is rebuilt from
    the saved init factors), though peft then warns of the missing keys."""
    config, file = load_config(path), os.path.join(path, "adapter_model.safetensors")
    if not config.frozen_adapter_weights():
        return []  # nothing a saver could have left out: the files are not read
    if not os.path.isfile(file):
        raise FileNotFoundError(f"peft_ext.complete_saved_adapter: no adapter_model.safetensors in '{path}'. Fix: "
                                f"pass the directory save_pretrained wrote (with safe_serialization).")
    weights = load_file(file)
    full = with_frozen_factors(config, weights)
    added = sorted(set(full) - set(weights))
    if added:
        save_file({k: v.contiguous() for k, v in full.items()}, file + ".tmp", metadata={"format": "pt"})
        os.replace(file + ".tmp", file)
    return added


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
