"""peft_ext: DuDe and CorDA adapters for peft, with exact reload and export to plain peft adapters."""

from .config import PeftExtConfig, __version__
from .dude import DuDeConfig
from .export import export_peft_adapter, load_adapter, load_config


__all__ = ["DuDeConfig", "PeftExtConfig", "__version__", "export_peft_adapter", "load_adapter", "load_config"]
