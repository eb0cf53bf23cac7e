"""Supervised fine-tuning with LoRA, PiSSA, DoRA, DuDe or CorDA, on TRL's SFTTrainer.

    python -m trl_recipes.sft                                   # the default run: DuDe on SmolLM2-135M, this CPU
    python -m trl_recipes.sft --config trl_recipes/recipes/SmolLM2-135M-Instruct/corda/config_kpm_cpu.yaml
    python -m trl_recipes.sft --config <recipe.yaml> --peft_method lora --max_steps 50 --output_dir outputs/x
    peft-ext-sft ...                                            # the same, as a console script

TRL's flags all work (`--model_name_or_path`, `--dataset_name` (a Hub id or a local JSONL file), `--packing`,
`--activation_checkpointing`, `--load_in_8bit`, `--learning_rate`, `--lora_r`, `--lora_alpha`,
`--lora_target_modules`, ...), plus `--peft_method lora|pissa|dora|dude|corda` and its options (`trl_recipes/args.py`).
A recipe YAML gives defaults, command-line flags override it, and unknown keys are an error; a packaged recipe is
found by its path under `trl_recipes/recipes/` from any directory (`trl_recipes/recipe.py`).

The run: load the model; answer a few held-out examples; for CorDA, calibrate on `--calibration_dataset` (default:
the training data) before the model is wrapped; train; save the adapter (`adapter/`), a plain peft export that loads
without peft_ext (`adapter_plain_peft/`), `metrics.json` and `loss_curve.png`; answer the held-out examples again and
print the comparison. `metrics.json` is written last: its presence marks a finished run.
"""

from __future__ import annotations

import sys
import time

from .args import PeftMethodArguments, get_peft_config
from .calibration import calibrate_corda, initialize_eva
from .dataset import load_datasets
from .distributed import end_processes
from .models import load_model
from .outputs import RunResult, finish_run
from .quantized import check_quantization, float_weights_path
from .recipe import DEFAULT_RECIPE, parse_recipe, run_cli
from .trainer import build_trainer, check_frozen_A, fit_to_device, init_factor_norms


def make_parser(subparsers=None):
    """TRL's parser of the SFT script's four argument dataclasses; a sub-command `sft` of `subparsers` when given
    (as TRL's own scripts do for the `trl` CLI)."""
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    dataclass_types = (ScriptArguments, SFTConfig, ModelConfig, PeftMethodArguments)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="SFT with LoRA, PiSSA, DoRA, DuDe or CorDA",
                                     dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog="trl_recipes.sft")


def parse_args(argv=None):
    """(script_args, training_args, model_args, method_args) from the command line and the recipe (`--config`,
    default: the DuDe CPU recipe); a RecipeError with one line for bad input."""
    return parse_recipe(make_parser(), sys.argv[1:] if argv is None else argv, DEFAULT_RECIPE)


def main(script_args, training_args, model_args, method_args) -> dict:
    """The run (TRL's script shape: parsed arguments in, the main process's metrics.json content out)."""
    started = time.time()
    from accelerate import PartialState

    from peft_ext import (PeftExtConfig, complete_saved_adapter, gathered_forward, is_deepspeed_zero3_enabled,
                          no_cpu_repacking)

    from .data import TRAIN_FILE
    from .evaluate import generate

    check_quantization(model_args, zero3=is_deepspeed_zero3_enabled())
    check_frozen_A(method_args, zero3=is_deepspeed_zero3_enabled())
    float_weights_path(method_args, model_args, "", check_only=True)  # a bad --float_weights fails before the load
    train, held_out, calibration = load_datasets(script_args, training_args, method_args)
    state = PartialState()  # initialises torch.distributed under accelerate/deepspeed launchers
    log = print if state.is_main_process else (lambda *a, **k: None)
    fit_to_device(training_args, log)
    model_path, tokenizer, model, quantization = load_model(model_args, state)
    log(f"[trl_recipes] {method_args.peft_method} on {model_path}: {len(train)} training examples -> "
        f"{training_args.output_dir}")
    prompts = [p for p, _ in held_out]
    # under ZeRO-3 the model is partitioned and has no engine yet; a 4-bit model must not repack before the init
    with gathered_forward(model), no_cpu_repacking(model):
        before = generate(model, tokenizer, prompts, method_args.eval_max_new_tokens) if held_out else []
    float_weights = float_weights_path(method_args, model_args, model_path)
    if float_weights:
        log(f"[trl_recipes] quantized base: decomposing the float weights of {float_weights}, residual quantized once")
    peft_config = get_peft_config(model_args, method_args, float_weights_path=float_weights)
    if method_args.peft_method == "corda":
        calibrate_corda(model, peft_config, method_args, calibration, tokenizer, verbose=state.is_main_process)
    trainer, init_norms = build_trainer(model, tokenizer, train, peft_config, training_args, method_args,
                                        quantization is not None, state.is_main_process)
    if method_args.peft_method == "eva":
        initialize_eva(trainer.model, calibration, tokenizer, method_args, verbose=state.is_main_process)
        init_norms = init_factor_norms(trainer.model)  # EVA's factors, not the ones before its init
    t0 = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    result = RunResult(method_args, script_args.dataset_name or TRAIN_FILE, model_path, training_args.output_dir,
                       trainer.model, trainer, len(train), held_out, before, [], time.time() - t0, init_norms, started)
    trainer.save_model(result.adapter_dir)
    if state.is_main_process and isinstance(peft_config, PeftExtConfig):
        complete_saved_adapter(result.adapter_dir)  # the frozen A that the trainer leaves out under ZeRO-3
    result.peft_model.eval()
    with no_cpu_repacking(result.peft_model):  # a repacked 4-bit weight could not be dequantized for the export
        result.after = generate(result.peft_model, tokenizer, prompts, method_args.eval_max_new_tokens) if held_out else []
    metrics = finish_run(result) if state.is_main_process else {}
    end_processes(state)
    return metrics


def run(argv=None) -> dict:
    """Parse `argv` (default: the command line) and run; the metrics of the run."""
    return main(*parse_args(argv))


def cli(argv=None) -> int:
    """The console entry (`peft-ext-sft`, `python -m trl_recipes.sft`): exit status 2 with one line for bad input."""
    return run_cli(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
