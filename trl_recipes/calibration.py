"""CorDA's calibration in a recipe run, before TRL wraps the model: peft_ext's `calibrate`, or peft's own
`preprocess_corda` on the same samples (`--corda_implementation peft`)."""

from __future__ import annotations


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
