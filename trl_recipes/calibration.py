"""Data-driven inits in a recipe run: CorDA's calibration before TRL wraps the model (peft_ext's `calibrate`, or
peft's own `preprocess_corda` on the same samples, `--corda_implementation peft`), and peft's EVA after it."""

from __future__ import annotations

import random


def calibrate_corda(model, peft_config, method_args, data, tokenizer, verbose: bool) -> None:
    import peft_ext

    text_field = method_args.calibration_text_field
    text_field = text_field.split(",") if text_field and "," in text_field else text_field
    common = dict(tokenizer=tokenizer, num_samples=method_args.calibration_samples,
                  max_length=method_args.calibration_max_length, seed=method_args.svd_seed, text_field=text_field,
                  verbose=verbose)
    if method_args.corda_implementation == "peft":
        peft_ext.calibrate_with_peft(model, peft_config, data, **common)
    else:
        peft_ext.calibrate(model, peft_config, data, batch_size=method_args.calibration_batch_size,
                           cache_file=method_args.calibration_cache, sequential=method_args.calibration_sequential,
                           sample_normalization=method_args.calibration_sample_normalization, **common)


def eva_batches(data, tokenizer, method_args) -> list[dict]:
    """EVA's data: the calibration records (the training conversations by default) as chat texts, the same seeded
    subset size, length and batch size as CorDA's calibration, right-padded with their attention masks."""
    from .dataset import pair_to_messages

    rows = [r["messages"] if "messages" in r else pair_to_messages(r)["messages"] for r in data]
    random.Random(method_args.svd_seed).shuffle(rows)
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows[:method_args.calibration_samples]]
    size = method_args.calibration_batch_size
    return [dict(tokenizer(texts[i:i + size], max_length=method_args.calibration_max_length, truncation=True,
                           padding=True, return_tensors="pt")) for i in range(0, len(texts), size)]


def initialize_eva(peft_model, data, tokenizer, method_args, verbose: bool) -> None:
    """peft's `initialize_lora_eva_weights` on the wrapped model, before the optimizer exists: EVA's SVD of the layer
    inputs, its ranks redistributed up to eva_rho · r (the total rank kept)."""
    from peft import initialize_lora_eva_weights

    initialize_lora_eva_weights(peft_model, eva_batches(data, tokenizer, method_args), show_progress_bar=verbose)
