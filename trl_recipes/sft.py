"""Supervised fine-tuning with LoRA, PiSSA, DoRA, DuDe or CorDA, on TRL's SFTTrainer.

    python -m trl_recipes.sft                                   # the default run: DuDe on SmolLM2-135M, this CPU
    python -m trl_recipes.sft --config trl_recipes/recipes/SmolLM2-135M-Instruct/corda/config_kpm_cpu.yaml
    python -m trl_recipes.sft --config <recipe.yaml> --peft_method lora --max_steps 50 --output_dir outputs/x
    peft-ext-sft ...                                            # the same, as a console script

TRL's flags all work (`--model_name_or_path`, `--dataset_name` (a Hub name or a local JSONL file), `--packing`,
`--gradient_checkpointing`, `--load_in_8bit`, `--learning_rate`, `--lora_r`, `--lora_alpha`, `--lora_target_modules`,
...), plus `--peft_method lora|pissa|dora|dude|corda` and its options (see `trl_recipes/args.py`). A recipe YAML
gives defaults, command-line flags override it, and unknown keys are an error.

The run: load the model; answer a few held-out examples; for CorDA, calibrate on `--calibration_dataset` (default:
the training prompts) before the model is wrapped; train; save the adapter (`adapter/`), a plain peft export that loads
without peft_ext (`adapter_plain_peft/`), `metrics.json` and `loss_curve.png`; answer the held-out examples again and
print the comparison. `metrics.json` is written last: its presence marks a finished run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from . import plots
from .args import DEFAULT_RECIPE, DEFAULT_TEST_FILE, DEFAULT_TRAIN_FILE, PeftMethodArguments, get_peft_config
from .dataset import DataError, load_split, pair_to_messages, prompt_and_reference, qa_to_messages, to_sft_format


class RecipeError(ValueError):
    """Bad command-line or recipe input: printed as one line, exit status 2."""


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if init_distributed_on_cpu():
        argv += ["--accelerator_config", json.dumps({"use_configured_state": True})]
    if "--config" not in argv:
        argv = ["--config", DEFAULT_RECIPE, *argv]
    config_path = argv[argv.index("--config") + 1]
    if not os.path.isfile(config_path):
        raise RecipeError(f"recipe '{config_path}' does not exist.")
    try:
        return make_parser().parse_args_and_config(argv, fail_with_unknown_args=True)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "Unknown arguments from config file" in msg:
            msg = f"recipe '{config_path}' has unknown keys: {msg.split(':', 1)[1].strip()}"
        raise RecipeError(msg) from exc


def check_frozen_A(method_args, zero3: bool) -> None:
    """`--train_lora_A false` under ZeRO-3 only where the config carries it: the trainer then saves only trainable
    parameters, and only peft_ext's CorDA can put a frozen A back (`peft_ext.complete_saved_adapter`)."""
    ours = method_args.peft_method == "corda" and method_args.corda_implementation == "peft_ext"
    if zero3 and method_args.train_lora_A is False and not ours:
        raise RecipeError(
            f"--train_lora_A false with --peft_method {method_args.peft_method}"
            + (" --corda_implementation peft" if method_args.peft_method == "corda" else "")
            + " under DeepSpeed ZeRO-3: the trainer saves only trainable parameters, so the frozen A factors would be "
            "missing from the saved adapter. Fix: peft_ext's CorDA (--peft_method corda), ZeRO-2 or DDP, or leave "
            "--train_lora_A unset."
        )


def check_quantization(model_args, zero3: bool) -> None:
    """bitsandbytes with DeepSpeed ZeRO-3, refused or fixed before the model loads."""
    if not zero3:
        return
    if model_args.load_in_8bit:
        raise RecipeError(
            "--load_in_8bit cannot be combined with DeepSpeed ZeRO-3 (bitsandbytes int8 weights cannot be "
            "partitioned). Fix: 8-bit with ZeRO-2 or DDP (deepspeed_configs/zero2.yaml, multi_gpu.yaml), or "
            "--load_in_4bit with ZeRO-3."
        )
    if model_args.load_in_4bit:
        dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
        if model_args.bnb_4bit_quant_storage is None:
            model_args.bnb_4bit_quant_storage = dtype  # ZeRO-3 shards 4-bit weights stored in the compute dtype
        elif model_args.bnb_4bit_quant_storage != dtype:
            raise RecipeError(
                f"--bnb_4bit_quant_storage {model_args.bnb_4bit_quant_storage} differs from the compute dtype "
                f"--dtype {dtype}; ZeRO-3 needs them equal. Fix: --bnb_4bit_quant_storage {dtype}."
            )


def float_weights_path(method_args, model_args, model_path: str, check_only: bool = False) -> Optional[str]:
    """The float checkpoint DuDe/CorDA decompose on a quantized base (`--float_weights`), or None."""
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    choice = method_args.float_weights
    if not quantized or method_args.peft_method not in ("dude", "corda") or choice.lower() == "none":
        return None
    if choice != "auto":
        if not os.path.exists(choice):
            raise RecipeError(f"--float_weights {choice}: no such file or folder. Fix: the folder of the model's "
                              f"safetensors checkpoint, 'auto', or 'none'.")
        return choice
    if check_only:
        return None
    if os.path.isdir(model_path):
        found = [f for f in os.listdir(model_path) if f.endswith(".safetensors")]
        return model_path if found else None
    try:  # a Hub model: its files are in the local cache after from_pretrained
        from huggingface_hub import snapshot_download

        return snapshot_download(model_path, revision=model_args.model_revision, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    except Exception:  # noqa: BLE001 - no local safetensors: decompose the dequantized weights
        return None


def settle_quantized_adapter_dtypes(model, sixteen_bit: bool, zero3: bool) -> None:
    """Fix up TRL's QLoRA cast of the adapter to bf16.

    TRL's SFTTrainer casts a quantized model's trainable parameters (all but DoRA's magnitude) to bf16, the QLoRA
    paper's recipe for bf16 training. In an fp32 run (the CPU recipes) that makes every adapter matmul a bf16 one
    (far slower on a CPU without bf16 instructions) and rounds DuDe/CorDA's principal factors, so the model at
    step 0 no longer equals the base:
    the factors are put back in fp32 from the exact initial ones peft_ext keeps (`lora_init_A/B`), other adapters are
    cast back. In a 16-bit run under ZeRO-3, which refuses trainable parameters of mixed dtypes, the DoRA magnitude
    follows the factors' dtype (as it does without quantization, see `peft_ext.variants.magnitude_dtype`), and so
    does a frozen A (CorDA-KPM's), which TRL's cast of the trainable parameters skipped.
    """
    import torch

    from peft_ext.variants import magnitude_dtype

    if sixteen_bit:
        dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_magnitude" not in n}
        if len(dtypes) == 1:
            factors = next(iter(dtypes))
            target = magnitude_dtype(factors, zero3=zero3)
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.data = param.data.to(target)
                elif ".lora_A." in name and not param.requires_grad:  # a frozen A (CorDA-KPM): TRL cast only B
                    param.data = param.data.to(factors)
        return
    for module in model.modules():
        init_A, init_B = getattr(module, "lora_init_A", {}), getattr(module, "lora_init_B", {})
        for adapter, layer in getattr(module, "lora_A", {}).items():
            if adapter in init_A:
                layer.weight.data = init_A[adapter].to(torch.float32).clone()
                module.lora_B[adapter].weight.data = init_B[adapter].to(torch.float32).clone()
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def load_datasets(script_args, training_args, method_args):
    """(train dataset, held-out records, CorDA calibration records or None) — validated before any work."""
    name = script_args.dataset_name or DEFAULT_TRAIN_FILE
    train = to_sft_format(load_split(name, script_args.dataset_train_split, script_args.dataset_config),
                          training_args.dataset_text_field, where=f"dataset '{name}'")
    held_out = []
    if method_args.eval_examples > 0:
        if script_args.dataset_name is None:
            test = load_split(DEFAULT_TEST_FILE)
        elif os.path.isfile(name):
            test = None
        else:
            try:
                test = load_split(name, script_args.dataset_test_split, script_args.dataset_config)
            except DataError:
                test = None
        if test is None:  # hold out the last examples of the training data
            n = min(method_args.eval_examples, max(len(train) // 10, 1))
            test, train = train.select(range(len(train) - n, len(train))), train.select(range(len(train) - n))
        records = [test[i] for i in range(min(method_args.eval_examples, len(test)))]
        try:
            held_out = [prompt_and_reference(r) for r in records]
        except DataError:
            held_out = []  # e.g. plain text data: nothing to answer
    calibration = calibration_data(method_args, train) if method_args.peft_method == "corda" else None
    return train, held_out, calibration


def calibration_data(method_args, train):
    """The calibration records. `--calibration_text_field messages` on question/answer or prompt/completion records
    calibrates on them as whole chat conversations (question and answer), the way the chat model sees them in
    training, not as raw text or prompts alone."""
    data = train
    if method_args.calibration_dataset:
        data = load_split(method_args.calibration_dataset, method_args.calibration_split)
    cols = set(data.column_names)
    if method_args.calibration_text_field == "messages" and "messages" not in cols:
        if {"question", "answer"} <= cols:
            data = data.map(qa_to_messages, remove_columns=sorted(cols))
        elif {"prompt", "completion"} <= cols:
            data = data.map(pair_to_messages, remove_columns=sorted(cols))
    return data  # records with messages / prompt / text: calibrate picks the field


def calibrate_corda(model, peft_config, method_args, data, tokenizer, verbose: bool) -> None:
    """CorDA's calibration before the model is wrapped: peft_ext's `calibrate`, or peft's `preprocess_corda`
    (`--corda_implementation peft`) on the same samples."""
    from peft_ext import calibrate

    text_field = method_args.calibration_text_field
    text_field = text_field.split(",") if text_field and "," in text_field else text_field
    common = dict(tokenizer=tokenizer, num_samples=method_args.calibration_samples,
                  max_length=method_args.calibration_max_length, seed=method_args.svd_seed, text_field=text_field,
                  verbose=verbose)
    if method_args.corda_implementation == "peft":
        from .peft_corda import calibrate_with_peft

        calibrate_with_peft(model, peft_config, data, **common)
    else:
        calibrate(model, peft_config, data, batch_size=method_args.calibration_batch_size,
                  cache_file=method_args.calibration_cache, sequential=method_args.calibration_sequential,
                  sample_normalization=method_args.calibration_sample_normalization, **common)


def init_distributed_on_cpu() -> bool:
    """Under a DeepSpeed launcher without GPUs, start the process group on gloo before anything reads the world size
    (TRL's argument parsing fills DeepSpeed's "auto" batch sizes from it, and ZeRO-3 partitions at model load).

    accelerate finds no backend on a CPU-only DeepSpeed launch and would count one process, so the shared state is
    created here with gloo; the caller then tells TrainingArguments to use it instead of resetting it."""
    import torch

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true" or torch.cuda.is_available():
        return False
    import deepspeed
    from accelerate import PartialState

    deepspeed.init_distributed(dist_backend="gloo")
    PartialState(backend="gloo")
    return True


def converts_at_save(method_args) -> bool:
    """peft's PiSSA and CorDA adapters apply to a residual base that peft cannot rebuild on reload: they are exported
    through peft's conversion to a plain LoRA (`path_initial_model_for_weight_conversion`)."""
    return method_args.peft_method == "pissa" or (
        method_args.peft_method == "corda" and method_args.corda_implementation == "peft")


def init_factor_norms(model) -> dict:
    """Per layer type (the last part of the module name, e.g. q_proj): the mean Frobenius norms of the adapter's
    lora_A and lora_B weights right after initialisation, and how many layers were averaged."""
    import torch

    sums: dict = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_A, torch.nn.ModuleDict) or "default" not in lora_A:
                continue
            kind = name.rsplit(".", 1)[-1]
            entry = sums.setdefault(kind, [0.0, 0.0, 0])
            entry[0] += float(lora_A["default"].weight.float().norm())
            entry[1] += float(lora_B["default"].weight.float().norm())
            entry[2] += 1
    return {k: {"A": a / n, "B": b / n, "layers": n} for k, (a, b, n) in sums.items()}


@dataclass
class RunResult:
    """What a finished training hands to `finish_run`: the trained model and the facts metrics.json records."""

    method_args: Any
    dataset: str
    model_path: str
    out_dir: str
    peft_model: Any
    trainer: Any
    train_examples: int
    held_out: list
    before: list
    after: list
    train_seconds: float
    init_norms: dict
    started: float = 0.0  # time.time() when main() began: metrics.json's run_seconds count from there

    @property
    def adapter_dir(self) -> str:
        return os.path.join(self.out_dir, "adapter")

    @property
    def plain_dir(self) -> str:
        return os.path.join(self.out_dir, "adapter_plain_peft")

    @property
    def merged_dir(self) -> str:
        return os.path.join(self.out_dir, "merged")

    @property
    def pissa_init_dir(self) -> str:  # peft uses the folder name as an adapter name
        return os.path.join(self.out_dir, "pissa_init")


def load_model(model_args, training_args, state, log):
    """(model path, tokenizer, model, quantization config): the base model, on this process's device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from .models import resolve_model_path

    if not torch.cuda.is_available() and (training_args.bf16 or training_args.fp16):
        log("[trl_recipes] no GPU: training in float32 (a bf16 matmul is ~100× slower than fp32 on this kind of CPU)")
        training_args.bf16 = training_args.fp16 = False
    model_path = resolve_model_path(model_args.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    except OSError as exc:  # transformers' long message about repo ids and local folders
        raise RecipeError(
            f"--model_name_or_path {model_path!r}: no such local model directory, and the hub has no model of that "
            f"name or cannot be reached ({str(exc).splitlines()[0][:160]}). Fix: the path of a directory with "
            f"config.json, tokenizer and weights, or leave it unset for the packaged SmolLM2-135M-Instruct."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    quantization = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, revision=model_args.model_revision, dtype=dtype or torch.float32,
        attn_implementation=model_args.attn_implementation, quantization_config=quantization,
        device_map=({"": state.local_process_index} if quantization is not None and torch.cuda.is_available() else None),
    )
    if quantization is None and torch.cuda.is_available():
        model.to(state.device)  # the held-out answers and the CorDA calibration run before the trainer places it
    return model_path, tokenizer, model, quantization


def build_trainer(model, tokenizer, train, peft_config, training_args, method_args, quantized: bool, main_process):
    """TRL's SFTTrainer with the adapter created; (trainer, factor norms at init). For peft's PiSSA/CorDA the initial
    adapter is saved for the conversion to a plain adapter at the end."""
    from trl import SFTTrainer

    from peft_ext import CorDAConfig, PeftExtConfig, expect_targets
    from peft_ext._compat import is_deepspeed_zero3_enabled

    if isinstance(peft_config, PeftExtConfig) and main_process:
        expect_targets(model, peft_config)  # the init progress bar's total
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)
    if quantized:
        settle_quantized_adapter_dtypes(trainer.model, sixteen_bit=training_args.bf16 or training_args.fp16,
                                        zero3=is_deepspeed_zero3_enabled())
    if method_args.train_lora_A is False and not isinstance(peft_config, CorDAConfig):  # CorDA's config freezes A
        for name, param in trainer.model.named_parameters():  # before train() builds the optimizer and DeepSpeed
            if ".lora_A." in name:
                param.requires_grad_(False)
    if converts_at_save(method_args) and main_process:
        # peft's route to a plain adapter for PiSSA (and its CorDA): keep the initial factors, convert at save time
        config = trainer.model.peft_config["default"]
        init, config.init_lora_weights = config.init_lora_weights, True
        trainer.model.save_pretrained(os.path.join(training_args.output_dir, "pissa_init"))
        config.init_lora_weights = init
    return trainer, init_factor_norms(trainer.model)


def main(script_args, training_args, model_args, method_args) -> dict:
    """The run (TRL's script shape: parsed arguments in, the main process's metrics.json content out)."""
    started = time.time()
    import torch
    from accelerate import PartialState

    from peft_ext import PeftExtConfig, complete_saved_adapter
    from peft_ext._compat import is_deepspeed_zero3_enabled
    from peft_ext.base_weight import no_cpu_repacking
    from peft_ext.distributed import gathered_forward

    from .evaluate import generate

    check_quantization(model_args, zero3=is_deepspeed_zero3_enabled())
    check_frozen_A(method_args, zero3=is_deepspeed_zero3_enabled())
    float_weights_path(method_args, model_args, "", check_only=True)  # a bad --float_weights fails before the load
    train, held_out, calibration = load_datasets(script_args, training_args, method_args)
    state = PartialState()  # initialises torch.distributed under accelerate/deepspeed launchers
    log = print if state.is_main_process else (lambda *a, **k: None)
    model_path, tokenizer, model, quantization = load_model(model_args, training_args, state, log)
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
    t0 = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    result = RunResult(method_args, script_args.dataset_name or DEFAULT_TRAIN_FILE, model_path,
                       training_args.output_dir, trainer.model, trainer, len(train), held_out, before, [],
                       time.time() - t0, init_norms, started)
    trainer.save_model(result.adapter_dir)
    if state.is_main_process and isinstance(peft_config, PeftExtConfig):
        complete_saved_adapter(result.adapter_dir)  # the frozen A that the trainer leaves out under ZeRO-3
    result.peft_model.eval()
    with no_cpu_repacking(result.peft_model):  # a repacked 4-bit weight could not be dequantized for the export
        result.after = generate(result.peft_model, tokenizer, prompts, method_args.eval_max_new_tokens) if held_out else []
    metrics = finish_run(result) if state.is_main_process else {}
    state.wait_for_everyone()  # the other ranks leave together with the main one (gloo aborts on a ragged exit)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return metrics


def run(argv=None) -> dict:
    """Parse `argv` (default: the command line) and run; the metrics of the run."""
    return main(*parse_args(argv))


def export_plain(r: RunResult) -> None:
    """The plain peft adapter beside the saved one (`adapter_plain_peft/`), loadable without peft_ext."""
    from peft_ext import export_peft_adapter

    if r.method_args.export_plain_peft:
        if converts_at_save(r.method_args):
            r.peft_model.save_pretrained(r.plain_dir, path_initial_model_for_weight_conversion=r.pissa_init_dir)
        elif r.method_args.peft_method in ("dude", "corda"):
            # from the saved files: complete even under ZeRO-3; the run owns its output directory
            export_peft_adapter(r.adapter_dir, r.plain_dir, overwrite=True)
        else:  # lora / dora adapters are plain peft already
            r.peft_model.save_pretrained(r.plain_dir)
    shutil.rmtree(r.pissa_init_dir, ignore_errors=True)


def save_merged(r: RunResult) -> None:
    """`--save_merged`: merged/, the base model reloaded from its checkpoint with the saved adapter merged into its
    weights (safetensors, the dtype the base was loaded in, tokenizer included). Built from the saved files, so it
    is complete under ZeRO-3 and for quantized training too (merged into the float checkpoint's weights)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import peft_ext

    dtype = getattr(r.peft_model.get_base_model().config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    base = AutoModelForCausalLM.from_pretrained(r.model_path, dtype=dtype)
    if os.path.isfile(os.path.join(r.plain_dir, "adapter_config.json")):
        model = PeftModel.from_pretrained(base, r.plain_dir)  # every method's plain export applies to this base
    elif r.method_args.peft_method in ("dude", "corda"):
        model = peft_ext.load_adapter(base, r.adapter_dir)
    else:  # lora / dora (PiSSA and peft's CorDA need the plain export: checked with the arguments)
        model = PeftModel.from_pretrained(base, r.adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(r.merged_dir, safe_serialization=True)
    r.trainer.processing_class.save_pretrained(r.merged_dir)


def held_out_examples(r: RunResult) -> list[dict]:
    from .evaluate import final_number

    return [
        {"prompt": p[-1]["content"], "reference": ref, "before": b, "after": a,
         "correct_before": final_number(b) is not None and final_number(b) == final_number(ref),
         "correct_after": final_number(a) is not None and final_number(a) == final_number(ref)}
        for (p, ref), b, a in zip(r.held_out, r.before, r.after)
    ]


def finish_run(r: RunResult) -> dict:
    """Main process: export (and merged model), loss curve, metrics.json (last) and the printed summary."""
    export_plain(r)
    if r.method_args.save_merged:
        save_merged(r)
    history = [(h["step"], h["loss"]) for h in r.trainer.state.log_history if "loss" in h]
    plots.plot_loss(history, os.path.join(r.out_dir, "loss_curve.png"),
              f"{r.method_args.peft_method} on {os.path.basename(r.model_path.rstrip('/'))}")
    examples = held_out_examples(r)
    steps = r.trainer.state.global_step
    metrics = {
        "peft_method": r.method_args.peft_method,
        "model": r.model_path,
        "dataset": r.dataset,
        "train_examples": r.train_examples,
        "global_steps": steps,
        "train_seconds": r.train_seconds,
        "seconds_per_step": r.train_seconds / max(steps, 1),
        # everything after the imports: model load, answers before and after, init (and calibration), training,
        # saving, exports; the setup (pip) and Python's start-up come on top
        "run_seconds": time.time() - r.started,
        "final_loss": history[-1][1] if history else None,
        "loss_history": history,
        "held_out_exact_match_before": (sum(e["correct_before"] for e in examples) / len(examples)) if examples else None,
        "held_out_exact_match_after": (sum(e["correct_after"] for e in examples) / len(examples)) if examples else None,
        "held_out_examples": examples,
        "init_factor_norms": r.init_norms,
        "trainable_parameters": sum(p.numel() for p in r.peft_model.parameters() if p.requires_grad),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "adapter_dir": r.adapter_dir,
        "plain_peft_dir": r.plain_dir if r.method_args.export_plain_peft else None,
        "merged_dir": r.merged_dir if r.method_args.save_merged else None,
        "peft_config": json.loads(json.dumps(r.peft_model.peft_config["default"].to_dict(), default=str)),
    }
    with open(os.path.join(r.out_dir, "metrics.json"), "w") as f:  # last: marks the run as finished
        json.dump(metrics, f, indent=1)
    print_summary(r, metrics, examples)
    return metrics


def print_summary(r: RunResult, metrics: dict, examples: list[dict]) -> None:
    print(f"\n[trl_recipes] done: {metrics['global_steps']} steps trained in {r.train_seconds:.0f} s, "
          f"{metrics['run_seconds']:.0f} s in all")
    print(f"  adapter:            {r.adapter_dir}")
    if r.method_args.export_plain_peft:
        print(f"  plain peft adapter: {r.plain_dir}   (PeftModel.from_pretrained, no peft_ext needed)")
    if r.method_args.save_merged:
        print(f"  merged model:       {r.merged_dir}   (AutoModelForCausalLM.from_pretrained; serve it with vLLM)")
    print(f"  metrics:            {os.path.join(r.out_dir, 'metrics.json')}")
    print(f"  loss curve:         {os.path.join(r.out_dir, 'loss_curve.png')}")
    for e in examples[:3]:
        print(f"\n  Q: {e['prompt']}\n  reference: {e['reference']!r}\n  before:    {e['before']!r}\n"
              f"  after:     {e['after']!r}")
    if examples:
        print(f"\n  held-out exact match (final number): {metrics['held_out_exact_match_before']:.2f} -> "
              f"{metrics['held_out_exact_match_after']:.2f} on {len(examples)} examples")


def cli(argv=None) -> int:
    """The console entry (`peft-ext-sft`, `python -m trl_recipes.sft`): exit status 2 with one line for bad input."""
    try:
        run(argv)
    except (RecipeError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
