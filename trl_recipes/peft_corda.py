"""peft's own CorDA (`preprocess_corda`), run on the same calibration samples as peft_ext's, for side-by-side runs.

peft's hooks need one sample per forward pass (batch 1); each sample's activations are divided by their maximum
before its covariance is added, as the CorDA authors do. `--corda_implementation peft` in `trl_recipes.sft` uses it.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from peft_ext._compat import preprocess_corda
from peft_ext.corda.calibration import prepare_calibration_data


def calibrate_with_peft(model, lora_config, data, *, tokenizer, num_samples: int, max_length: int, seed: int,
                        text_field=None, verbose: bool = True) -> int:
    """Run peft's `preprocess_corda` on `model` for `lora_config` (a LoraConfig with init_lora_weights='corda') over
    the samples peft_ext's `calibrate` would pick from `data` with the same arguments; returns the sample count."""
    kind, rows = prepare_calibration_data(data, tokenizer, num_samples=num_samples, max_length=max_length, seed=seed,
                                          text_field=text_field)
    if kind != "rows":
        raise ValueError("peft's CorDA calibration takes texts or records here, not pre-made batches.")
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
