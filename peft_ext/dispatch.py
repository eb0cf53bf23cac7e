"""peft's custom-module dispatch for every target of a peft_ext config: the layer class for its base type."""

from __future__ import annotations

from torch import nn

from ._compat import Conv1D
from .layer import PeftExtLinear, base_of
from .quantization import bnb_layer_class


def create_peft_ext_layer(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module:
    """The peft_ext layer for `target`, or a clear error (after rolling back the layers this injection created
    already) for a type that cannot be decomposed."""
    base = base_of(target)
    cls = bnb_layer_class(base) if type(base).__module__.startswith("bitsandbytes") else (
        PeftExtLinear if isinstance(base, (nn.Linear, Conv1D)) else None)
    if cls is not None:
        return cls(target, adapter_name, config=config, **kwargs)
    config.peft_ext_runtime.abort()
    raise ValueError(
        f"peft_ext {config.peft_ext_method}: target_modules matched layer '{kwargs.get('target_name') or '<unnamed>'}' "
        f"of type {type(base).__name__}, which cannot be decomposed; only torch.nn.Linear, transformers' Conv1D and "
        f"bitsandbytes' Linear8bitLt/Linear4bit can. Fix: narrow target_modules (e.g. 'all-linear' or a list of "
        f"projection names)."
    )
