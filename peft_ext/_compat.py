"""The one seam to third-party internals: every private peft / transformers / bitsandbytes symbol peft_ext uses.

Nothing else in peft_ext or trl_recipes imports from these libraries' internal modules (tests/test_layout.py checks
it). The contracts relied on, per symbol, hold for the peft release line below; the range is checked at import, so
another peft fails here with a clear message instead of deep inside a layer.

peft (``SUPPORTED_PEFT``):
  * ``LoraLinear`` / ``LoraLayer`` (``peft.tuners.lora.layer``): ``update_layer(adapter_name, r, lora_alpha, config=,
    **kwargs)`` creating ``lora_A``/``lora_B`` and calling ``reset_lora_parameters(name, config.init_lora_weights)``,
    ``resolve_lora_variant(*, config, **kwargs)``, ``set_adapter``, ``delete_adapter``, ``merge``;
  * ``LoraLinear8bitLt`` / ``LoraLinear4bit`` (``peft.tuners.lora.bnb``; None without bitsandbytes);
  * ``DoraLinearLayer`` (``peft.tuners.lora.dora``): ``forward(x, *, lora_A, lora_B, scaling, base_layer,
    base_result, adapter_name)``, ``get_weight_norm(weight, lora_weight, scaling, adapter_name)``;
    ``DoraLinearVariant`` (``peft.tuners.lora.variants``): ``init``/``forward``/``merge_*``/``unmerge`` statics;
  * ``register_frozen_peft_weight`` (``peft.tuners.lora.variants._register_frozen_peft_weight``, what MiCA uses to
    keep ``lora_B`` frozen): adds a weight to the layer's ``frozen_peft_weight_names``, which peft's ``set_adapter``,
    ``set_requires_grad`` and ``_mark_only_adapters_as_trainable`` keep at ``requires_grad=False``;
  * ``BufferDict`` (``peft.tuners._buffer_dict``): persistent buffers that peft saves with the adapter;
  * ``LoraConfig._register_custom_module`` (a method, used in ``config.py``): peft's custom-module dispatch;
  * ``LoraModel._pre_injection_hook(model, config, adapter_name)``: called by ``BaseTuner.__init__`` (so by
    ``get_peft_model``, ``PeftModel.from_pretrained`` and ``inject_adapter_in_model``) with the model before any layer
    is created; documented by peft as the override point for pre-injection work. ``add_pre_injection_hook`` wraps it
    once, calling peft's own first (CorDA's calibration by config runs there);
  * ``maybe_include_all_linear_layers``, ``check_target_module_exists``, ``BaseTunerLayer``: target resolution;
  * ``gather_params_ctx``, ``get_bnb_param_type``, ``dequantize_bnb_weight``, ``dequantize_module_weight``,
    ``transpose`` (``peft.utils``);
  * ``preprocess_corda``, ``PeftCordaConfig``: peft's own CorDA, run beside ours by trl_recipes.
transformers: ``Conv1D`` (GPT-2's transposed linear layer), ``is_deepspeed_zero3_enabled``.
"""

from __future__ import annotations

import peft
from packaging.version import Version


SUPPORTED_PEFT = (Version("0.21.2"), Version("0.22"))  # [low, high)

if not SUPPORTED_PEFT[0] <= Version(peft.__version__) < SUPPORTED_PEFT[1]:
    raise ImportError(
        f"peft_ext needs peft >= {SUPPORTED_PEFT[0]}, < {SUPPORTED_PEFT[1]} (it builds on that release line's LoRA "
        f"layer and DoRA variant internals), but peft {peft.__version__} is installed. Fix: pip install "
        f"'peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}'."
    )

from peft.tuners._buffer_dict import BufferDict  # noqa: E402
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig  # noqa: E402
from peft.tuners.lora.dora import DoraLinearLayer  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402
from peft.tuners.lora.model import LoraModel  # noqa: E402
from peft.tuners.lora.variants import DoraLinearVariant  # noqa: E402
from peft.tuners.lora.variants import _register_frozen_peft_weight as register_frozen_peft_weight  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers as maybe_include_all_linear_layers  # noqa: E402
from peft.utils.integrations import (  # noqa: E402
    dequantize_bnb_weight,
    dequantize_module_weight,
    gather_params_ctx,
    get_bnb_param_type,
)
from peft.utils.other import get_pattern_key, transpose  # noqa: E402
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


try:  # bitsandbytes is an optional extra
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
except ImportError:
    bnb = LoraLinear4bit = LoraLinear8bitLt = None


def check_target_module_exists(config, key: str) -> bool:
    """peft's own matching of a module name against `target_modules` / `exclude_modules` / layer patterns."""
    return bool(LoraModel._check_target_module_exists(config, key))


_PRE_INJECTION_HOOKS: list = []


def add_pre_injection_hook(fn) -> None:
    """Call `fn(model, config, adapter_name)` after peft's own `LoraModel._pre_injection_hook`, before any layer of
    an injection is created. LoRA-typed configs all pass through it; `fn` returns at once for configs it does not
    handle. peft's method is wrapped once, whatever the number of hooks."""
    if fn not in _PRE_INJECTION_HOOKS:
        _PRE_INJECTION_HOOKS.append(fn)
    if getattr(LoraModel._pre_injection_hook, "_peft_ext_hooks", None) is _PRE_INJECTION_HOOKS:
        return
    original = LoraModel._pre_injection_hook

    def hook(self, model, config, adapter_name):
        original(self, model, config, adapter_name)
        for each in _PRE_INJECTION_HOOKS:
            each(model, config, adapter_name)

    hook._peft_ext_hooks = _PRE_INJECTION_HOOKS
    LoraModel._pre_injection_hook = hook


def preprocess_corda(*args, **kwargs):
    """peft's own CorDA preprocessing (trl_recipes' side-by-side arm), imported on first use: its module imports
    `attrs`, which peft does not declare, so importing it eagerly would make peft_ext fail to import without it."""
    from peft.tuners.lora.corda import preprocess_corda as run

    return run(*args, **kwargs)


__all__ = [
    "BaseTunerLayer", "BufferDict", "Conv1D", "DoraLinearLayer", "DoraLinearVariant", "LoraLayer", "LoraLinear",
    "LoraLinear4bit", "LoraLinear8bitLt", "PeftCordaConfig", "SUPPORTED_PEFT", "add_pre_injection_hook", "bnb",
    "check_target_module_exists", "dequantize_bnb_weight", "dequantize_module_weight", "gather_params_ctx",
    "get_bnb_param_type", "get_pattern_key", "is_deepspeed_zero3_enabled", "maybe_include_all_linear_layers",
    "preprocess_corda", "register_frozen_peft_weight", "transpose",
]
