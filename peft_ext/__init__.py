"""peft_ext: DuDe and CorDA adapters for peft, with exact reload and export to plain peft adapters."""

from .config import PeftExtConfig, __version__, load_config
from .corda import Calibration, CorDAConfig, calibrate
from .dude import DuDeConfig
from .export import export_peft_adapter
from .loading import complete_saved_adapter, load_adapter
from .targets import expect_targets


__all__ = [
    "Calibration",
    "CorDAConfig",
    "DuDeConfig",
    "PeftExtConfig",
    "__version__",
    "calibrate",
    "complete_saved_adapter",
    "expect_targets",
    "export_peft_adapter",
    "load_adapter",
    "load_config",
]
