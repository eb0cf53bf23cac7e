"""GRPO after SFT: continue a DuDe, CorDA or LoRA adapter of `trl_recipes.sft` with TRL's GRPOTrainer and a
verifiable reward: 1 for the right final number, plus 0.2 for an answer that ends in "#### <number>"
(`trl_recipes/rewards.py`).

    python -m trl_recipes.grpo --sft_adapter outputs/SmolLM2-135M-Instruct-dude      # the SFT run to continue
    python -m trl_recipes.grpo --config <recipe.yaml> --sft_adapter <dir> --max_steps 5 --output_dir out

Recipe and flags as in `trl_recipes.sft` (TRL's GRPO flags, YAML defaults, unknown keys refused). The data: the
packaged prompts (trl_recipes/data/grpo_train.jsonl, problems after the SFT recipes' 720, with their reference
answers); `--dataset_name openai/gsm8k --dataset_config main` takes GSM8K's question/answer records. With `beta > 0`
the reference model is TRL's copy of the SFT adapter. The run reports the mean reward of greedy answers to held-out
prompts (`--eval_prompts`), its correct and well-formed parts, before (the SFT model) and after, plus
trl_recipes.evaluate's task and knowledge metrics.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .data import GRPO_EVAL_FILE, GRPO_TRAIN_FILE
from .dataset import DataError
from .recipe import RECIPES_DIR, parse_recipe, run_cli
from .rewards import REWARD_FUNCS, correctness_reward, format_reward
from .stage import StageArguments, run_stage

DEFAULT_RECIPE = f"{RECIPES_DIR}/SmolLM2-135M-Instruct/grpo/config_cpu.yaml"


@dataclass
class RewardArguments(StageArguments):
    eval_prompts: str = field(default=GRPO_EVAL_FILE,
                              metadata={"help": "Held-out prompts with reference answers for the before/after reward."})
    eval_reward_tokens: int = field(default=96, metadata={"help": "Tokens generated per held-out answer."})


def make_parser():
    from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, GRPOConfig, ModelConfig, RewardArguments), prog="trl_recipes.grpo")


def parse_args(argv=None):
    return parse_recipe(make_parser(), sys.argv[1:] if argv is None else argv, DEFAULT_RECIPE)


def as_prompts(records) -> list[dict]:
    """{"prompt": [user message], "answer": reference} records from prompt/answer or GSM8K question/answer ones."""
    out = []
    for r in records:
        if "answer" not in r or not ({"prompt", "question"} & set(r)):
            raise DataError(f"a GRPO record needs a prompt (or question) and an answer; it has {sorted(r)}. Fix: "
                            f"records as trl_recipes/data/grpo_train.jsonl, or GSM8K's question/answer.")
        prompt = r["prompt"] if "prompt" in r else [{"role": "user", "content": r["question"]}]
        out.append({"prompt": prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}],
                    "answer": r["answer"]})
    return out


def reward_metrics(model, tokenizer, records: list[dict], max_new_tokens: int) -> dict:
    """Mean reward of greedy answers to `records`, and its two parts."""
    from .evaluate import generate

    texts = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, desc="prompts: answering")
    answers = [r["answer"] for r in records]
    correct, formatted = correctness_reward(texts, answers), format_reward(texts)
    n = len(records)
    return {"mean_reward": (sum(correct) + sum(formatted)) / n, "correct": sum(correct) / n,
            "well_formed": sum(f > 0 for f in formatted) / n, "prompts": n, "example": texts[0] if texts else None}


def load_prompts(script_args, args) -> tuple:
    from datasets import Dataset

    from .dataset import load_split
    from .evaluate import read_records

    name = script_args.dataset_name or GRPO_TRAIN_FILE
    split = load_split(name, script_args.dataset_train_split, script_args.dataset_config)
    train = Dataset.from_list(as_prompts(split[i] for i in range(len(split))))
    return train, as_prompts(read_records(args.eval_prompts))


def main(script_args, training_args, model_args, args) -> dict:
    from trl import GRPOTrainer

    def measure(policy, tokenizer, held_out, before):
        return {"reward": reward_metrics(policy, tokenizer, held_out, args.eval_reward_tokens)}

    def build(policy, training_args, train, tokenizer):
        return GRPOTrainer(model=policy, args=training_args, train_dataset=train, processing_class=tokenizer,
                           reward_funcs=REWARD_FUNCS)

    metrics = run_stage("grpo", (script_args, training_args, model_args, args), load_prompts, measure, build)
    if metrics:
        print_summary(metrics)
    return metrics


def print_summary(m: dict) -> None:
    b, a = m["before"]["reward"], m["after"]["reward"]
    print(f"\n[trl_recipes] GRPO of the {m['method']} SFT adapter: {m['global_steps']} steps in "
          f"{m['train_seconds']:.0f} s\n  held-out mean reward {b['mean_reward']:.3f} -> {a['mean_reward']:.3f} "
          f"(correct {b['correct']:.2f} -> {a['correct']:.2f}, well formed {b['well_formed']:.2f} -> "
          f"{a['well_formed']:.2f})")
    for part, key in (("task", "answer_nll"), ("knowledge", "gold_nll")):
        if part in m["before"]:
            print(f"  {part} {key}: {m['before'][part][key]:.4f} -> {m['after'][part][key]:.4f}")
    print(f"  adapter: {m['adapter_dir']}")


def cli(argv=None) -> int:
    """`python -m trl_recipes.grpo`: exit status 2 with one line for bad input."""
    return run_cli(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
