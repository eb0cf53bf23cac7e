"""CorDA's calibration run by `get_peft_model` itself, from the `CalibrationData` a `CorDAConfig` carries.

peft calls a tuner's pre-injection hook with the model it is about to adapt, before any layer is created (the seam,
`_compat.add_pre_injection_hook`). For a `CorDAConfig` with nothing attached, the hook calibrates that model there:
the same `peft_ext.calibrate` a user would call, so it shards over the ranks of a running torch.distributed job and
runs block by block (one block gathered at a time) under ZeRO-3. A trainer that builds the model and calls
`get_peft_model` (TRL's SFT, DPO and GRPO trainers with `peft_config=`) therefore needs nothing else.

A config with no calibration attached and no data named is refused here, before any work, with both routes.
"""

from __future__ import annotations

import torch

from .._compat import add_pre_injection_hook
from .calibration import _is_batch, calibrate, load_samples
from .calibration_data import CalibrationData, load_source, resolve_tokenizer
from .config import CorDAConfig


def calibrate_at_injection(model, config, adapter_name: str) -> None:
    """The pre-injection hook: calibrate `model` for `config` when it is a CorDAConfig with nothing attached."""
    if not isinstance(config, CorDAConfig):
        return
    runtime = config.peft_ext_runtime
    if runtime.calibration is not None or runtime.stored_init is not None:  # calibrated already, or a reload
        return
    spec = config.calibration_data
    if spec is None or spec.data is None:
        raise ValueError(missing_calibration_message(adapter_name, spec))
    samples = load_samples(load_source(spec))  # listed; empty data refused here
    tokenizer = None if _is_batch(samples[0]) else resolve_tokenizer(spec, model)
    calibrate(model, config, samples, tokenizer=tokenizer, num_samples=spec.num_samples, max_length=spec.max_length,
              batch_size=spec.batch_size, seed=spec.seed, text_field=spec.text_field,
              sample_normalization=spec.sample_normalization, sequential=spec.sequential,
              cache_file=spec.cache_file, covariance_dtype=getattr(torch, spec.covariance_dtype))


def missing_calibration_message(adapter_name: str, spec: CalibrationData | None) -> str:
    saved = f" (it was saved from {spec.data_description}, which the saved config does not hold)" if spec else ""
    return (
        f"peft_ext corda: adapter '{adapter_name}': the CorDAConfig has no calibration attached and names no "
        f"calibration data{saved}. Fix, either route: name the data in the config, "
        f"CorDAConfig(..., calibration_data=CalibrationData('calib.jsonl', num_samples=256)) (or a Dataset, a list "
        f"of texts, a Hub id), and get_peft_model calibrates the model it is given; or call "
        f"peft_ext.calibrate(model, config, data, tokenizer=tok) before get_peft_model. A saved CorDA adapter is "
        f"reloaded with peft_ext.load_adapter(model, path)."
    )


def install() -> None:
    """Run `calibrate_at_injection` at every peft LoRA-typed injection (idempotent); peft_ext.corda calls it."""
    add_pre_injection_hook(calibrate_at_injection)
