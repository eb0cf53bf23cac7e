"""peft_ext: DuDe and CorDA adapters for peft, with exact reload and export to plain peft adapters.

Everything a client needs is imported from here (the public API, `docs/api.md`); the submodules are internal.
"""

from ._compat import is_deepspeed_zero3_enabled
from .base_weight import no_cpu_repacking
from .config import PeftExtConfig, __version__, load_config
from .corda import Calibration, CalibrationData, CorDAConfig, calibrate
from .corda.covariance import SAMPLE_NORMALIZATIONS
from .corda.peft_reference import calibrate_with_peft, peft_corda_config
from .corda.sample_keys import calibration_overlap, sample_digest, sample_key
from .distributed import gathered_forward
from .dude import DuDeConfig
from .export import export_peft_adapter
from .jsonl import read_jsonl
from .loading import complete_saved_adapter, load_adapter
from .precision import settle_adapter_dtypes
from .targets import expect_targets


__all__ = [
    "Calibration",
    "CalibrationData",
    "CorDAConfig",
    "DuDeConfig",
    "PeftExtConfig",
    "SAMPLE_NORMALIZATIONS",
    "__version__",
    "calibrate",
    "calibrate_with_peft",
    "calibration_overlap",
    "complete_saved_adapter",
    "expect_targets",
    "export_peft_adapter",
    "gathered_forward",
    "is_deepspeed_zero3_enabled",
    "load_adapter",
    "load_config",
    "no_cpu_repacking",
    "peft_corda_config",
    "read_jsonl",
    "sample_digest",
    "sample_key",
    "settle_adapter_dtypes",
]
