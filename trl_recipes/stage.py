"""What a second stage after SFT shares (`trl_recipes.dpo`, `trl_recipes.grpo`): the SFT run's adapter loaded
trainable on its base model, the task and knowledge evaluation before and after, and what a finished run leaves.

The policy starts as the SFT model. TRL's trainers, given a model that holds a trained adapter and no `ref_model`,
copy that adapter as their reference ("ref"): for DuDe and CorDA a twin that shares the layer's residual
(docs/dude.md, "A second stage after SFT"). The copy is deleted before the adapter is saved.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .data import KNOWLEDGE_EVAL_FILE, TEST_FILE
from .recipe import RecipeError


@dataclass
class StageArguments:
    """The SFT adapter to continue and the evaluation around the stage."""

    sft_adapter: Optional[str] = field(
        default=None,
        metadata={"help": "The SFT run to continue: its --output_dir (holding adapter/) or an adapter directory "
                          "(peft_ext or plain peft, e.g. adapter_plain_peft/). Required."},
    )
    task_eval_data: str = field(
        default=TEST_FILE, metadata={"help": "Task records for the answer NLL and exact match before and after "
                                             "('none' skips; default: the packaged held-out problems)."}
    )
    knowledge_eval_data: str = field(
        default=KNOWLEDGE_EVAL_FILE, metadata={"help": "NQ-open-style records for the knowledge NLL and exact match "
                                                       "('none' skips; default: the packaged EfficientQA slice)."}
    )
    eval_examples: int = field(default=20, metadata={"help": "Task exact match on the first N records (NLL on all)."})
    num_knowledge: int = field(default=200, metadata={"help": "Knowledge questions evaluated."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per held-out answer."})
    export_plain_peft: bool = field(
        default=True, metadata={"help": "Also write a plain peft adapter (loads without peft_ext) after training."}
    )


def sft_adapter_dir(path: Optional[str]) -> str:
    """The adapter directory `--sft_adapter` names: itself, or the adapter/ of an SFT run's output directory."""
    if not path:
        raise RecipeError("--sft_adapter is required: the SFT run to continue (its --output_dir, or an adapter "
                          "directory). Fix: e.g. --sft_adapter outputs/SmolLM2-135M-Instruct-dude.")
    for candidate in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
            return candidate
    raise RecipeError(f"--sft_adapter '{path}' holds no adapter_config.json, nor does its adapter/. Fix: the "
                      f"--output_dir of a finished trl_recipes.sft run, or an adapter directory.")


def adapter_kind(adapter_dir: str) -> str:
    """The adapter's method as trl_recipes names it: the peft_ext method, else 'dora' or 'lora'."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    return config.get("peft_ext_method") or ("dora" if config.get("use_dora") else "lora")


def load_policy(model_args, stage_args, state):
    """(model path, tokenizer, trainable PeftModel, method): the base model with the SFT adapter, its trainable
    weights trainable again (a frozen CorDA A stays frozen)."""
    from peft import PeftModel

    import peft_ext

    from .evaluate import adapter_to_load
    from .models import load_model

    adapter = sft_adapter_dir(stage_args.sft_adapter)
    path, is_peft_ext = adapter_to_load(adapter)  # checked before the model is loaded
    model_path, tokenizer, model, _ = load_model(model_args, state)
    if is_peft_ext:
        policy = peft_ext.load_adapter(model, path, is_trainable=True)
    else:
        policy = PeftModel.from_pretrained(model, path, is_trainable=True)
    return model_path, tokenizer, policy, adapter_kind(path)


def eval_records(stage_args) -> tuple[Optional[list], Optional[list]]:
    """(task records, knowledge records) of the evaluation; None for a part given as 'none'."""
    from .evaluate import read_part

    return read_part(stage_args.task_eval_data), read_part(stage_args.knowledge_eval_data, stage_args.num_knowledge)


def task_and_knowledge(model, tokenizer, stage_args, records) -> dict:
    """trl_recipes.evaluate's task and knowledge metrics of `model` as it is now (the active adapter)."""
    from .evaluate import evaluate

    task, knowledge = records
    return evaluate(model, tokenizer, task, knowledge, task_max_new_tokens=stage_args.eval_max_new_tokens,
                    task_generation_examples=stage_args.eval_examples)


def save_stage(trainer, out_dir: str, stage_args, main_process: bool) -> dict:
    """The trained adapter (TRL's reference copy deleted first), completed and exported; their directories."""
    import peft_ext

    model = trainer.model
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    adapter_dir, plain_dir = os.path.join(out_dir, "adapter"), os.path.join(out_dir, "adapter_plain_peft")
    trainer.save_model(adapter_dir)
    is_peft_ext = isinstance(model.peft_config["default"], peft_ext.PeftExtConfig)
    if main_process and is_peft_ext:
        peft_ext.complete_saved_adapter(adapter_dir)
        if stage_args.export_plain_peft:
            peft_ext.export_peft_adapter(adapter_dir, plain_dir, overwrite=True)
    return {"adapter_dir": adapter_dir, "plain_peft_dir": plain_dir if is_peft_ext and stage_args.export_plain_peft
            else None}


def write_run(out_dir: str, trainer, title: str, metrics: dict) -> dict:
    """loss_curve.png, then metrics.json (last: its presence marks a finished run), with the loss history."""
    from . import plots
    from .outputs import loss_history

    history = loss_history(trainer)
    plots.plot_loss(history, os.path.join(out_dir, "loss_curve.png"), title)
    metrics = {**metrics, "global_steps": trainer.state.global_step, "loss_history": history,
               "final_loss": history[-1][1] if history else None}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def run_stage(stage: str, parsed, load_data: Callable, measure: Callable, build_trainer: Callable) -> dict:
    """A second stage from its parsed arguments (script, training, model, stage): the data (`load_data(script_args,
    args)` -> (train dataset, held-out records), checked before the model loads), the SFT policy, the stage's own
    metric (`measure(policy, tokenizer, held_out, before)`, `before` None before training) and the task and
    knowledge metrics before and after training, the saved adapter and export, metrics.json (main process)."""
    from accelerate import PartialState

    from .trainer import fit_to_device

    script_args, training_args, model_args, args = parsed
    started, state = time.time(), PartialState()
    train, held_out = load_data(script_args, args)
    records = eval_records(args)
    fit_to_device(training_args, print if state.is_main_process else (lambda *a, **k: None))
    model_path, tokenizer, policy, method = load_policy(model_args, args, state)
    before = {**measure(policy, tokenizer, held_out, None), **task_and_knowledge(policy, tokenizer, args, records)}
    trainer = build_trainer(policy, training_args, train, tokenizer)
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    after = {**measure(policy, tokenizer, held_out, before), **task_and_knowledge(policy, tokenizer, args, records)}
    dirs = save_stage(trainer, training_args.output_dir, args, state.is_main_process)
    if not state.is_main_process:
        return {}
    metrics = {"stage": stage, "method": method, "sft_adapter": args.sft_adapter, "model": model_path,
               "beta": training_args.beta, "learning_rate": training_args.learning_rate, "seed": training_args.seed,
               "before": before, "after": after, "train_seconds": train_seconds,
               "run_seconds": time.time() - started, **dirs}
    return write_run(training_args.output_dir, trainer, f"{stage.upper()} after SFT ({method})", metrics)
