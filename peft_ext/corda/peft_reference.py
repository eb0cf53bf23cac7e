"""peft's own CorDA (`preprocess_corda` with `LoraConfig(init_lora_weights="corda")`), run on the samples that
`peft_ext.calibrate` would use, for side-by-side comparisons with ours.

peft's hooks need one sample per forward pass (batch 1), and each sample's activations are divided by their maximum
before its covariance is added, as the CorDA authors do. trl_recipes' `--corda_implementation peft` and the
benchmarks use these two functions.
"""

from __future__ import annotations

from typing import Optional

import torch
from peft import LoraConfig
from tqdm.auto import tqdm

from .._compat import PeftCordaConfig, preprocess_corda
from .calibration import prepare_calibration_data


def peft_corda_config(*, corda_method: str = "ipm", covariance_file: Optional[str] = None, **lora_kwargs) -> LoraConfig:
    """A `LoraConfig` for peft's CorDA (`init_lora_weights="corda"`); `covariance_file`: peft's own cache of the
    covariances (a torch pickle, read unchecked when it exists); other keywords go to `LoraConfig`."""
    if corda_method not in ("kpm", "ipm"):
        raise ValueError(f"peft_ext.peft_corda_config: corda_method={corda_method!r}. Fix: 'kpm' or 'ipm'.")
    return LoraConfig(**lora_kwargs, init_lora_weights="corda",
                      corda_config=PeftCordaConfig(corda_method=corda_method, covariance_file=covariance_file))


def _is_token_rows(data) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], (list, tuple)) and bool(data[0]) \
        and isinstance(data[0][0], int)


def calibrate_with_peft(model, lora_config: LoraConfig, data, *, tokenizer=None, num_samples: int = 256,
                        max_length: int = 256, seed: int = 0, text_field=None, verbose: bool = True) -> int:
    """Run peft's `preprocess_corda` on `model` for `lora_config` (see `peft_corda_config`) over the samples
    `peft_ext.calibrate` would pick from `data` with the same arguments, or over `data` itself when it is a list of
    token-id lists; returns the number of samples. Then call `get_peft_model(model, lora_config)`."""
    if _is_token_rows(data):
        rows = [list(r) for r in data]
    else:
        kind, rows = prepare_calibration_data(data, tokenizer, num_samples=num_samples, max_length=max_length,
                                              seed=seed, text_field=text_field)
        if kind != "rows":
            raise ValueError("peft_ext.calibrate_with_peft: peft's CorDA takes texts, records or token-id lists here, "
                             "not batches of tensors. Fix: pass the samples instead.")
    device = next(model.parameters()).device

    def run_model():
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for row in tqdm(rows, desc="peft preprocess_corda (batch 1)", unit="sample", disable=not verbose):
                model(input_ids=torch.tensor([row], device=device), use_cache=False)
        model.train(was_training)

    preprocess_corda(model, lora_config, run_model=run_model)
    return len(rows)
