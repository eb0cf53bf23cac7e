"""DPO after SFT: continue a DuDe, CorDA or LoRA adapter of `trl_recipes.sft` on preference pairs, with TRL's
DPOTrainer and its implicit reference model (a copy of the SFT adapter).

    python -m trl_recipes.dpo --sft_adapter outputs/SmolLM2-135M-Instruct-dude      # the SFT run to continue
    python -m trl_recipes.dpo --config <recipe.yaml> --sft_adapter <dir> --learning_rate 2e-5 --output_dir out

Recipe and flags as in `trl_recipes.sft` (TRL's DPO flags, YAML defaults, unknown keys refused). The data: the
packaged pairs (trl_recipes/data/preferences_train.jsonl, a worked answer against the same answer with one
arithmetic slip; `--dataset_name` takes others in TRL's preference format). The run reports, on held-out pairs
(`--eval_pairs`), before (the SFT model) and after: preference accuracy (the policy gives the chosen answer a higher
log-probability than the rejected one), and after, the implicit reward margin β·[(log π − log π_ref)(chosen) −
(log π − log π_ref)(rejected)] and its accuracy; plus trl_recipes.evaluate's task and knowledge metrics.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .data import PREFERENCE_EVAL_FILE, PREFERENCE_TRAIN_FILE
from .dataset import DataError
from .recipe import RECIPES_DIR, parse_recipe, run_cli
from .stage import StageArguments, run_stage

DEFAULT_RECIPE = f"{RECIPES_DIR}/SmolLM2-135M-Instruct/dpo/config_cpu.yaml"


@dataclass
class PreferenceArguments(StageArguments):
    eval_pairs: str = field(default=PREFERENCE_EVAL_FILE,
                            metadata={"help": "Held-out preference pairs for the before/after preference metrics."})


def make_parser():
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, DPOConfig, ModelConfig, PreferenceArguments), prog="trl_recipes.dpo")


def parse_args(argv=None):
    return parse_recipe(make_parser(), sys.argv[1:] if argv is None else argv, DEFAULT_RECIPE)


def log_probs(model, tokenizer, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) of every pair under `model`, summed over the answer."""
    from .evaluate import answer_nll

    prompts = [p["prompt"] for p in pairs]
    answers = {k: [p[k][-1]["content"] if isinstance(p[k], list) else p[k] for p in pairs]
               for k in ("chosen", "rejected")}
    chosen = answer_nll(model, tokenizer, prompts, answers["chosen"], desc="pairs: chosen", total=True)
    rejected = answer_nll(model, tokenizer, prompts, answers["rejected"], desc="pairs: rejected", total=True)
    return [-x for x in chosen], [-x for x in rejected]


def preference_metrics(logps, beta: float, reference=None) -> dict:
    """Preference accuracy of a policy's log-probabilities; against a reference's, the implicit reward margins."""
    chosen, rejected = logps
    out = {"preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(chosen), "pairs": len(chosen)}
    if reference is not None:
        margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, *reference)]
        out.update(reward_margin=sum(margins) / len(margins), reward_accuracy=sum(m > 0 for m in margins) / len(margins))
    return out


def load_pairs(script_args, args) -> tuple:
    """(training pairs as a Dataset, held-out pairs as records), checked before the model is loaded."""
    from .dataset import load_split
    from .evaluate import read_records

    name = script_args.dataset_name or PREFERENCE_TRAIN_FILE
    train = load_split(name, script_args.dataset_train_split, script_args.dataset_config)
    missing = {"prompt", "chosen", "rejected"} - set(train.column_names)
    if missing:
        raise DataError(f"dataset '{name}' lacks the preference columns {sorted(missing)} (it has "
                        f"{train.column_names}). Fix: prompt/chosen/rejected records, as TRL's DPOTrainer takes.")
    return train, read_records(args.eval_pairs)


def pair_metrics(policy, tokenizer, held_out, before, beta: float) -> dict:
    """The held-out pairs' log-probabilities and preference metrics; after training (`before` given), against the
    SFT model's log-probabilities."""
    chosen, rejected = log_probs(policy, tokenizer, held_out)
    reference = None if before is None else (before["preference"]["log_probs"]["chosen"],
                                             before["preference"]["log_probs"]["rejected"])
    return {"preference": {**preference_metrics((chosen, rejected), beta, reference),
                           "log_probs": {"chosen": chosen, "rejected": rejected}}}


def main(script_args, training_args, model_args, args) -> dict:
    from trl import DPOTrainer

    def measure(policy, tokenizer, held_out, before):
        return pair_metrics(policy, tokenizer, held_out, before, training_args.beta)

    def build(policy, training_args, train, tokenizer):
        return DPOTrainer(model=policy, args=training_args, train_dataset=train, processing_class=tokenizer)

    metrics = run_stage("dpo", (script_args, training_args, model_args, args), load_pairs, measure, build)
    if metrics:
        print_summary(metrics)
    return metrics


def print_summary(m: dict) -> None:
    b, a = m["before"], m["after"]
    print(f"\n[trl_recipes] DPO of the {m['method']} SFT adapter: {m['global_steps']} steps in "
          f"{m['train_seconds']:.0f} s\n  held-out preference accuracy {b['preference']['preference_accuracy']:.2f}"
          f" -> {a['preference']['preference_accuracy']:.2f}; reward margin {a['preference']['reward_margin']:+.3f} "
          f"(accuracy {a['preference']['reward_accuracy']:.2f})")
    for part, key in (("task", "answer_nll"), ("task", "exact_match"), ("knowledge", "gold_nll")):
        if part in b and b[part].get(key) is not None:
            print(f"  {part} {key}: {b[part][key]:.4f} -> {a[part][key]:.4f}")
    print(f"  adapter: {m['adapter_dir']}\n  metrics: {m['adapter_dir'].rsplit('/', 1)[0]}/metrics.json")


def cli(argv=None) -> int:
    """`python -m trl_recipes.dpo`: exit status 2 with one line for bad input."""
    return run_cli(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
