"""Reload a peft_ext adapter exactly, and convert it into a plain peft adapter for the untouched base model.

A saved peft_ext adapter directory is a normal peft directory (adapter_config.json + adapter_model.safetensors) whose
state dict also holds the init factors `lora_init_A`/`lora_init_B` of every layer. Those rebuild the residual base
weight W − s·B0·A0 bit for bit, without re-running the decomposition (which, for CorDA, would also need the
calibration data).

Export: the trained layer computes (W − s·B0A0) + s·BA = W + s·[B, −B0]·[A; A0], so a plain LoRA/DoRA adapter of
rank 2r with B' = [B, −B0], A' = [A; A0] and the same scaling reproduces it on the original W. Same scaling at twice the
rank means lora_alpha' = 2·lora_alpha (√2·lora_alpha with rsLoRA). A DoRA magnitude carries over unchanged, because
the direction W + s'·B'A' is the same matrix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict, load_peft_weights
from safetensors.torch import save_file

from .config import PeftExtConfig
from .layer import PeftExtLinear


CONFIG_NAME = "adapter_config.json"
_BASE_PREFIX = "base_model.model."
_INIT_SUFFIXES = (".lora_init_A", ".lora_init_B")


def config_class_for(method: Optional[str], where: str = "config") -> type[PeftExtConfig]:
    """The config class of a peft_ext method name."""
    from .dude import DuDeConfig

    from .corda import CorDAConfig

    classes: dict[str, type[PeftExtConfig]] = {"dude": DuDeConfig, "corda": CorDAConfig}
    if method not in classes:
        raise ValueError(
            f"peft_ext: {where} has peft_ext_method={method!r}; known methods are {sorted(classes)}. "
            f"Fix: a directory without peft_ext_method is a plain peft adapter: load it with "
            f"peft.PeftModel.from_pretrained."
        )
    return classes[method]


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
    config_class_for(data.get("peft_ext_method"), where=f"'{config_file}'")
    return PeftExtConfig.from_peft_type(**data)


def _stored_init_factors(weights: dict[str, torch.Tensor], path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, list[Optional[torch.Tensor]]] = {}
    for key, value in weights.items():
        for i, suffix in enumerate(_INIT_SUFFIXES):
            if key.endswith(suffix):
                name = key[: -len(suffix)].removeprefix(_BASE_PREFIX)
                pairs.setdefault(name, [None, None])[i] = value
    if not pairs:
        raise ValueError(
            f"peft_ext: '{path}' holds no lora_init_A/lora_init_B tensors, so its residual base weights cannot be "
            f"rebuilt. Fix: save the PeftModel with save_pretrained (a trainer checkpoint of it works too)."
        )
    broken = sorted(n for n, (a, b) in pairs.items() if a is None or b is None)
    if broken:
        raise ValueError(f"peft_ext: '{path}' has only one of lora_init_A/lora_init_B for {broken}; the file is damaged.")
    return {n: (a, b) for n, (a, b) in pairs.items()}


def load_adapter(
    model: torch.nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False,
    float_weights_path: Optional[str] = None, **kwargs
) -> PeftModel:
    """Load a saved DuDe/CorDA adapter onto the original base model and return the PeftModel.

    The residual base weights are rebuilt from the saved init factors (no SVD, no calibration data), so the result
    reproduces the saved model's outputs. For a quantized base decomposed from its float checkpoint, that checkpoint is
    read again: the saved `float_weights_path`, or `float_weights_path` given here (the same weights, elsewhere).
    `kwargs` go to `peft.PeftModel.from_pretrained`.
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
    config.__dict__["_peft_ext_stored_init"] = stored
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def _plain_config(config: PeftExtConfig) -> LoraConfig:
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    plain_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    kwargs = {k: v for k, v in config.to_dict().items() if k in plain_fields}
    kwargs.update(
        r=2 * config.r,
        lora_alpha=factor * config.lora_alpha,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: factor * v for k, v in (config.alpha_pattern or {}).items()},
        init_lora_weights=True,
        use_dora=bool(config.use_dora),
    )
    return LoraConfig(**kwargs)


def export_peft_adapter(model_or_dir, output_dir: str, adapter_name: str = "default") -> str:
    """Write a plain peft LoRA (DoRA for DuDe) adapter of rank 2r that applies to the *original* base weights.

    `model_or_dir` is the PeftModel (from get_peft_model or `load_adapter`), or the directory `save_pretrained` wrote:
    the export is a transformation of the adapter's state dict, so a saved directory needs no model (useful after
    DeepSpeed ZeRO-3 training, where the live parameters are partitioned). The result loads with
    `peft.PeftModel.from_pretrained(base_model, output_dir)` in an environment without peft_ext. Returns `output_dir`.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        config = load_config(os.fspath(model_or_dir))
        state = load_peft_weights(os.fspath(model_or_dir), device="cpu")
    else:
        config = model_or_dir.peft_config.get(adapter_name)
        if not isinstance(config, PeftExtConfig):
            raise ValueError(
                f"peft_ext.export_peft_adapter: adapter '{adapter_name}' is a {type(config).__name__}, not a DuDe/CorDA "
                f"adapter. Fix: pass the PeftModel returned by get_peft_model(model, DuDeConfig/CorDAConfig) or "
                f"peft_ext.load_adapter; a plain peft adapter needs no export."
            )
        for name, module in model_or_dir.named_modules():
            if isinstance(module, PeftExtLinear) and adapter_name in module.merged_adapters:
                raise ValueError(
                    f"peft_ext.export_peft_adapter: adapter '{adapter_name}' is merged into layer '{name}'. "
                    f"Fix: call unmerge_adapter() first."
                )
        state = get_peft_model_state_dict(model_or_dir, adapter_name=adapter_name)
    exported: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(_INIT_SUFFIXES):
            continue
        if value.numel() == 0:
            raise ValueError(
                f"peft_ext.export_peft_adapter: '{key}' is empty (a DeepSpeed ZeRO-3 partition?). Fix: export from "
                f"the directory the trainer saved (export_peft_adapter(adapter_dir, out_dir))."
            )
        if key.endswith(".lora_A.weight"):
            init = state[key[: -len(".lora_A.weight")] + ".lora_init_A"]
            value = torch.cat([value.float(), init.float()], dim=0)
        elif key.endswith(".lora_B.weight"):
            init = state[key[: -len(".lora_B.weight")] + ".lora_init_B"]
            value = torch.cat([value.float(), -init.float()], dim=1)
        exported[key] = value.detach().cpu().contiguous()
    os.makedirs(output_dir, exist_ok=True)
    _plain_config(config).save_pretrained(output_dir)
    save_file(exported, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return output_dir
