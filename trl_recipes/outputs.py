"""What a finished run leaves behind (main process): the plain peft export, the merged model, the loss curve,
metrics.json (written last: its presence marks a finished run) and the printed summary."""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from typing import Any

from . import plots


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


def export_plain(r: RunResult) -> None:
    """The plain peft adapter beside the saved one (`adapter_plain_peft/`), loadable without peft_ext."""
    from peft_ext import export_peft_adapter

    if r.method_args.export_plain_peft:
        if r.method_args.converts_at_save():
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


def exact_match(examples: list[dict], side: str):
    return sum(e[f"correct_{side}"] for e in examples) / len(examples) if examples else None


def metrics_of(r: RunResult, history: list, examples: list[dict]) -> dict:
    steps = r.trainer.state.global_step
    return {
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
        "held_out_exact_match_before": exact_match(examples, "before"),
        "held_out_exact_match_after": exact_match(examples, "after"),
        "held_out_examples": examples,
        "init_factor_norms": r.init_norms,
        "trainable_parameters": sum(p.numel() for p in r.peft_model.parameters() if p.requires_grad),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "adapter_dir": r.adapter_dir,
        "plain_peft_dir": r.plain_dir if r.method_args.export_plain_peft else None,
        "merged_dir": r.merged_dir if r.method_args.save_merged else None,
        "peft_config": json.loads(json.dumps(r.peft_model.peft_config["default"].to_dict(), default=str)),
    }


def loss_history(trainer) -> list[tuple[int, float]]:
    """(step, training loss) of every logged step of a finished Trainer."""
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def finish_run(r: RunResult) -> dict:
    """Main process: export (and merged model), loss curve, metrics.json (last) and the printed summary."""
    export_plain(r)
    if r.method_args.save_merged:
        save_merged(r)
    history = loss_history(r.trainer)
    plots.plot_loss(history, os.path.join(r.out_dir, "loss_curve.png"),
                    f"{r.method_args.peft_method} on {os.path.basename(r.model_path.rstrip('/'))}")
    examples = held_out_examples(r)
    metrics = metrics_of(r, history, examples)
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
