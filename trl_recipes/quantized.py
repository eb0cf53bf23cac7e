"""bitsandbytes bases: what is refused or fixed before the model loads, and the float checkpoint DuDe/CorDA decompose."""

from __future__ import annotations

import os
from typing import Optional

from .recipe import RecipeError


def check_quantization(model_args, zero3: bool) -> None:
    """bitsandbytes with DeepSpeed ZeRO-3, refused or fixed before the model loads."""
    if not zero3:
        return
    if model_args.load_in_8bit:
        raise RecipeError(
            "--load_in_8bit cannot be combined with DeepSpeed ZeRO-3 (bitsandbytes int8 weights cannot be "
            "partitioned). Fix: 8-bit with ZeRO-2 or DDP (deepspeed_configs/zero2.yaml, multi_gpu.yaml), or "
            "--load_in_4bit with ZeRO-3."
        )
    if model_args.load_in_4bit:
        dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
        if model_args.bnb_4bit_quant_storage is None:
            model_args.bnb_4bit_quant_storage = dtype  # ZeRO-3 shards 4-bit weights stored in the compute dtype
        elif model_args.bnb_4bit_quant_storage != dtype:
            raise RecipeError(
                f"--bnb_4bit_quant_storage {model_args.bnb_4bit_quant_storage} differs from the compute dtype "
                f"--dtype {dtype}; ZeRO-3 needs them equal. Fix: --bnb_4bit_quant_storage {dtype}."
            )


def float_weights_path(method_args, model_args, model_path: str, check_only: bool = False) -> Optional[str]:
    """The float checkpoint DuDe/CorDA decompose on a quantized base (`--float_weights`), or None."""
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    choice = method_args.float_weights
    if not quantized or method_args.peft_method not in ("dude", "corda") or choice.lower() == "none":
        return None
    if choice != "auto":
        if not os.path.exists(choice):
            raise RecipeError(f"--float_weights {choice}: no such file or folder. Fix: the folder of the model's "
                              f"safetensors checkpoint, 'auto', or 'none'.")
        return choice
    if check_only:
        return None
    if os.path.isdir(model_path):
        found = [f for f in os.listdir(model_path) if f.endswith(".safetensors")]
        return model_path if found else None
    try:  # a Hub model: its files are in the local cache after from_pretrained
        from huggingface_hub import snapshot_download

        return snapshot_download(model_path, revision=model_args.model_revision, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    except Exception:  # noqa: BLE001 - no local safetensors: decompose the dequantized weights
        return None
