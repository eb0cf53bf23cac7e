"""Does a finished recipe run reproduce a run that a recipe_forgetting report recorded?

    python -m trl_recipes.sft --config trl_recipes/recipes/SmolLM2-135M-Instruct/corda/config_kpm_cpu.yaml \
        --output_dir outputs/kpm_rerun
    python -m benchmarks.recipe_rerun --run outputs/kpm_rerun \
        --report benchmarks/results/recipe_forgetting/recipe_forgetting_frozenA_rates.json \
        --arm CorDA-KPM-frozenA-1.6e-3 --out benchmarks/results/recipe_forgetting/kpm_recipe_rerun_seed42

The run's metrics.json (factor norms at init, final loss, held-out exact match) and its adapter, evaluated as
recipe_forgetting evaluates (merged; answer NLL on the 60 packaged test problems and on the 200 packaged knowledge
questions), are set beside the recorded run of that arm and seed, with the relative differences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from peft_ext import read_jsonl

from benchmarks.common import machine, markdown_table, stamp, write_report


def evaluate(run: str, model: str) -> dict:
    """Task and knowledge NLL of the run's merged adapter, as recipe_forgetting's job computes them."""
    import torch

    from trl_recipes.data import KNOWLEDGE_EVAL_FILE, TEST_FILE
    from trl_recipes.dataset import prompt_and_reference
    from trl_recipes.evaluate import KNOWLEDGE_INSTRUCTION, answer_nll, load_for_eval

    models = load_for_eval(model, adapter=os.path.join(run, "adapter"))
    merged = models.after.merge_and_unload().eval()
    torch.manual_seed(0)
    task = [prompt_and_reference(r) for r in read_jsonl(TEST_FILE)]
    know = read_jsonl(KNOWLEDGE_EVAL_FILE)
    prompts = [[{"role": "user", "content": KNOWLEDGE_INSTRUCTION.format(question=r["question"])}] for r in know]
    return {"task_nll": statistics.mean(answer_nll(merged, models.tokenizer, [p for p, _ in task], [a for _, a in task])),
            "knowledge_nll": statistics.mean(answer_nll(merged, models.tokenizer, prompts, [r["answer"][0] for r in know]))}


def rows(metrics: dict, evaluated: dict, recorded: dict) -> list[list[str]]:
    def rel(a: float, b: float) -> str:
        return f"{abs(a - b) / abs(b):.1e}"

    norms = [(k, f) for k in recorded["init_factor_norms"] for f in ("A", "B")]
    worst = max(norms, key=lambda kf: abs(metrics["init_factor_norms"][kf[0]][kf[1]]
                                          - recorded["init_factor_norms"][kf[0]][kf[1]]) / recorded["init_factor_norms"][kf[0]][kf[1]])
    pairs = [("final training loss", metrics["final_loss"], recorded["final_loss"]),
             ("task answer NLL (60)", evaluated["task_nll"], recorded["task_nll"]),
             ("knowledge gold NLL (200)", evaluated["knowledge_nll"], recorded["knowledge_nll"]),
             (f"mean ‖{worst[1]}‖ of {worst[0]} at init (the largest difference)",
              metrics["init_factor_norms"][worst[0]][worst[1]], recorded["init_factor_norms"][worst[0]][worst[1]])]
    out = [[name, f"{a:.8g}", f"{b:.8g}", rel(a, b)] for name, a, b in pairs]
    out.append(["held-out exact match (20)", f"{metrics['held_out_exact_match_after']:.2f}", f"{recorded['em_after']:.2f}",
                "equal" if metrics["held_out_exact_match_after"] == recorded["em_after"] else "differs"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the output_dir of a finished trl_recipes.sft run")
    ap.add_argument("--report", required=True, help="a recipe_forgetting report's JSON")
    ap.add_argument("--arm", required=True)
    ap.add_argument("--seed_index", type=int, default=0, help="which of the arm's recorded runs (0: seed 42)")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out", required=True, help="report path without extension")
    ap.add_argument("--note", default="", help="how the run was made, for the report")
    args = ap.parse_args(argv)
    recorded = json.load(open(args.report))["results"][args.arm][args.seed_index]
    metrics = json.load(open(os.path.join(args.run, "metrics.json")))
    table = rows(metrics, evaluate(args.run, args.model), recorded)
    text = (f"# A recipe run beside the run `{args.arm}` (seed index {args.seed_index}) of {os.path.basename(args.report)}"
            f"\n\nCommand: `python -m benchmarks.recipe_rerun --run {args.run} --report {args.report} --arm {args.arm}`  \n"
            f"Machine: {machine()}  \nDate: {stamp()}\n\n" + (f"{args.note}\n\n" if args.note else "")
            + markdown_table(["measure", "this run", "recorded", "relative difference"], table))
    write_report(args.out + ".md", text, {"args": vars(args), "rows": table})


if __name__ == "__main__":
    main()
