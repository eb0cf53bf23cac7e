"""Turn a peft_ext adapter into a plain peft adapter for the untouched base model.

The trained layer computes (W − s·B0A0) + s·BA = W + s·[B, −B0]·[A; A0], so a plain LoRA/DoRA adapter of rank 2r with
B' = [B, −B0], A' = [A; A0] and the same scaling reproduces it on the original W. Same scaling at twice the rank means
lora_alpha' = 2·lora_alpha (√2·lora_alpha with rsLoRA). A DoRA magnitude carries over unchanged, because the
direction W + s'·B'A' is the same matrix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import warnings

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, load_peft_weights
from safetensors.torch import save_file

from .config import PeftExtConfig, load_config
from .layer import ResidualInitMixin
from .loading import INIT_SUFFIXES, with_frozen_factors


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


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _check_destination(output_dir: str, overwrite: bool) -> None:
    """Refuse a directory that holds an adapter already (the peft_ext one being exported, often), before any work."""
    held = [f for f in ADAPTER_FILES if os.path.isfile(os.path.join(output_dir, f))]
    if held and not overwrite:
        raise FileExistsError(
            f"peft_ext.export_peft_adapter: output_dir={output_dir!r} already holds an adapter ({', '.join(held)}); "
            f"writing there would replace it (a peft_ext adapter's init factors would be lost). Fix: choose an empty "
            f"or new directory, or pass overwrite=True."
        )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"peft_ext.export_peft_adapter: output_dir={output_dir!r} is a file. Fix: a directory.")
    existing = os.path.abspath(output_dir)  # the folder the export will create its folders in
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"peft_ext.export_peft_adapter: cannot write to {output_dir!r}. Fix: a writable path.")


def _write_atomically(output_dir: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write into a temporary directory beside `output_dir`, then move the files in: a failure leaves the old files,
    and no stale adapter file (an old adapter_model.bin beside a new .safetensors) remains."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".peft_ext_export-", dir=parent)
    try:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        os.makedirs(output_dir, exist_ok=True)
        for name in ADAPTER_FILES:
            if os.path.isfile(os.path.join(output_dir, name)) and not os.path.isfile(os.path.join(tmp, name)):
                os.remove(os.path.join(output_dir, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_peft_adapter(model_or_dir, output_dir: str, adapter_name: str = "default", overwrite: bool = False) -> str:
    """Write a plain peft LoRA (DoRA for DuDe) adapter of rank 2r that applies to the *original* base weights.

    `model_or_dir` is the PeftModel (from get_peft_model or `load_adapter`), or the directory `save_pretrained` wrote:
    the export is a transformation of the adapter's state dict, so a saved directory needs no model (useful after
    DeepSpeed ZeRO-3 training, where the live parameters are partitioned). The result loads with
    `peft.PeftModel.from_pretrained(base_model, output_dir)` in an environment without peft_ext. Returns `output_dir`.

    A directory that already holds an adapter is refused unless `overwrite=True`; the files are written through a
    temporary directory, so a failed export leaves the directory as it was.
    """
    _check_destination(output_dir, overwrite)
    if isinstance(model_or_dir, (str, os.PathLike)):
        config = load_config(os.fspath(model_or_dir))
        state = with_frozen_factors(config, load_peft_weights(os.fspath(model_or_dir), device="cpu"))
    else:
        config = model_or_dir.peft_config.get(adapter_name)
        if not isinstance(config, PeftExtConfig):
            raise ValueError(
                f"peft_ext.export_peft_adapter: adapter '{adapter_name}' is a {type(config).__name__}, not a DuDe/CorDA "
                f"adapter. Fix: pass the PeftModel returned by get_peft_model(model, DuDeConfig/CorDAConfig) or "
                f"peft_ext.load_adapter; a plain peft adapter needs no export."
            )
        for name, module in model_or_dir.named_modules():
            if isinstance(module, ResidualInitMixin) and adapter_name in module.merged_adapters:
                raise ValueError(
                    f"peft_ext.export_peft_adapter: adapter '{adapter_name}' is merged into layer '{name}'. "
                    f"Fix: call unmerge_adapter() first."
                )
        state = get_peft_model_state_dict(model_or_dir, adapter_name=adapter_name)
    exported: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(INIT_SUFFIXES):
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
    plain = _plain_config(config)
    _warn_if_not_servable(plain)
    _write_atomically(output_dir, plain, exported)
    return output_dir


VLLM_MAX_LORA_RANK = 512


def _warn_if_not_servable(plain: LoraConfig) -> None:
    """vLLM serves LoRA adapters up to rank 512 and no DoRA; say so where the export cannot be served as is."""
    rank = max([plain.r, *(plain.rank_pattern or {}).values()])
    if not plain.use_dora and rank > VLLM_MAX_LORA_RANK:
        warnings.warn(
            f"peft_ext.export_peft_adapter: the plain adapter has rank {rank} (2r), above vLLM's maximum LoRA rank "
            f"{VLLM_MAX_LORA_RANK}; vLLM will refuse it. Fix for serving: merge it (merge_and_unload, or "
            f"trl_recipes.sft --save_merged) and serve the merged model, or train with r <= {VLLM_MAX_LORA_RANK // 2}."
        )
