"""Forgetting with the shipped CPU recipes: does CorDA-KPM keep more knowledge than LoRA at the recipes' own length?

Each arm runs a shipped recipe (trl_recipes/recipes/SmolLM2-135M-Instruct/...) as a user would: its 60 steps on the
shipped arithmetic data, changed only by `--seed` (and `--output_dir`). Each trained adapter is then evaluated against
the base model on two splits, each with
  * its own task: answer NLL over 60 held-out arithmetic problems;
  * knowledge: NQ-open gold-answer NLL on questions of the EfficientQA dev file that are not in NQ-open dev, the file
    the KPM recipe's calibration slice comes from (so none of them was seen by the calibration).
The validation split (trl_recipes/data/test.jsonl and efficientqa_knowledge_eval.jsonl, 200 questions, more with
--data_dir) is where the recipes' rates were chosen and where any further choice is made (`rate_choices`); the final
test split (test_final.jsonl, efficientqa_knowledge_final.jsonl, 200) is where results are reported. The recipe's own
exact match on the first 20 problems of test.jsonl (measured by trl_recipes.sft) is a validation number.
The verdicts use compare_methods' rules (benchmarks/verdicts.py): a difference counts when it exceeds twice its
standard error over seeds, paired by seed (a seed fixes the order of the training batches for every arm); comparable
task gain means a task NLL at most 1.25x the reference's. An arm with `--rank_allocation budgeted` is read against its
uniform twin (and DuDe's and IPM's against every `--peft_method eva` arm) by `budget_rows`.

    python -m benchmarks.recipe_forgetting      # LoRA and CorDA-KPM, 3 seeds: ~40 min on 2 CPU cores
    python -m benchmarks.recipe_forgetting --arms "LoRA=lora/config_cpu.yaml;KPM-unbalanced=corda/config_kpm_cpu.yaml --corda_balance_factors false"

An arm is `NAME=RECIPE [sft flags]` (the recipe path relative to the SmolLM2 recipe folder); arms are separated by
`;`. Runs go two at a time with one thread each; finished runs and evaluations in `--work_dir` are reused, and so
are the runs of an earlier report given with `--reuse REPORT.json` whose arm (recipe and flags, whatever its name),
seed and recipe contents match, with its base evaluation; the report names how many were reused and from where.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time

from peft_ext import read_jsonl

from benchmarks.common import (ROOT, SMOL, Slots, add_data_dir_argument, data_file, fmt, machine, markdown_table,
                               mean_std, paired, parallel, run_in_slot, stamp, write_jsonl, write_report)
from benchmarks.verdicts import (comparable_gain, curve_verdicts, equal_gain_rows, equal_gain_table,
                                 gain_and_forgetting, kpm_claim, lora_rates, sign_verdict)

DEFAULT_ARMS = "LoRA=lora/config_cpu.yaml;CorDA-KPM=corda/config_kpm_cpu.yaml"
RESULT_FILE = "forgetting_eval_splits.json"  # one run's evaluation on both splits (`evaluate_splits`)


def parse_arms(spec: str) -> dict[str, tuple[str, list[str]]]:
    arms = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, rest = part.partition("=")
        words = shlex.split(rest)
        if not name or not words or not os.path.isfile(os.path.join(SMOL, words[0])):
            sys.exit(f"error: --arms entry {part!r}: expected NAME=RECIPE [flags] with RECIPE under {SMOL}.")
        arms[name.strip()] = (words[0], words[1:])
    return arms


def arm_rate(recipe: str, flags: list[str]) -> float:
    """The learning rate an arm trains with: its `--learning_rate` flag (the last one, as the parser reads it), else
    its recipe's."""
    rate = None
    for i, word in enumerate(flags):
        if word == "--learning_rate" and i + 1 < len(flags):
            rate = flags[i + 1]
        elif word.startswith("--learning_rate="):
            rate = word.partition("=")[2]
    if rate is None:
        import yaml

        with open(os.path.join(SMOL, recipe)) as f:
            rate = yaml.safe_load(f)["learning_rate"]
    try:
        return float(rate)
    except ValueError:
        sys.exit(f"error: --arms entry {recipe} {' '.join(flags)}: learning rate {rate!r} is not a number; "
                 "give it as e.g. --learning_rate 2e-4.")


def along_rates(arms: dict, results: dict) -> dict:
    """{(arm, rate): runs} for `equal_gain_rows`: every arm named LoRA... is one rate of LoRA; any other arm is its
    own. Two LoRA arms at one rate are refused: they would be one point of LoRA's curve."""
    out, names = {}, {}
    for name, runs in results.items():
        key = ("LoRA" if name.startswith("LoRA") else name, arm_rate(*arms[name]))
        if key in out:
            sys.exit(f"error: --arms {names[key]!r} and {name!r} are both LoRA at learning rate {key[1]:g}; give one "
                     "of them another rate, or a name that does not start with 'LoRA'.")
        out[key], names[key] = runs, name
    return out


def equal_gain_text(rows: list[list], lora_arms: int) -> str:
    """The `equal_gain_rows` of these arms, where two LoRA arms or more ran; else empty."""
    if not rows or lora_arms < 2:
        return ""
    where = {"holds": "below LoRA's curve", "does not hold": "above LoRA's curve", "not shown": "on LoRA's curve "
             "(within noise)"}
    return ("## Every recipe against LoRA at equal task gain, along LoRA's rates (final test split)\n\nEach arm is "
            "held against LoRA's gold NLL change at the arm's mean task gain (base task NLL minus the arm's), read "
            "linearly in gain between the two LoRA arms whose mean gains bracket it (per seed, the same weights), among "
            "LoRA's best rates; above every LoRA gain, LoRA's largest-gain arm; below every one, not decided. The "
            "paired difference, arm − LoRA there, decides by the 2-standard-error rule (compare_methods' equal-gain "
            "reading, fixed in commit ac63a54). Below LoRA's curve: less forgetting at the same gain.\n\n"
            + equal_gain_table(rows, "gold NLL change", arm="recipe")
            + "\n\n" + "; ".join(f"{arm} lies **{where.get(v, v)}**" for arm, v in curve_verdicts(rows).items())
            + ".")


def tradeoff_figure(complete: dict, base: dict, path: str) -> None:
    """The arms of `along_rates` along their rates: task gain against gold-NLL change."""
    from trl_recipes.plots import pyplot

    from benchmarks.plots import rate_curves, tradeoff_plot

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tradeoff_plot(pyplot(), rate_curves(complete), base, path,
                  axes=("task gain: answer NLL decrease on the shipped test set →",
                        "forgetting: held-out NQ gold NLL increase ↓"))


def knowledge_records(data_dir, n: int) -> list[dict]:
    """The first n EfficientQA dev questions absent from NQ-open dev (the source of the KPM recipe's calibration
    slice): the packaged slice holds the first 200; more are read from the upstream files in `data_dir`."""
    from trl_recipes.data import KNOWLEDGE_EVAL_FILE

    packaged = read_jsonl(KNOWLEDGE_EVAL_FILE)
    if n <= len(packaged):
        return packaged[:n]
    from trl_recipes.data import KNOWLEDGE_FINAL_FILE

    # neither a calibration question nor one of the final test split's
    away = {r["question"].strip().lower() for r in read_jsonl(data_file(data_dir, "nq_open/NQ-open.dev.jsonl"))
            + read_jsonl(KNOWLEDGE_FINAL_FILE)}
    pool = read_jsonl(data_file(data_dir, "nq_open/NQ-open.efficientqa.dev.1.1.jsonl"))
    return [r for r in pool if r["question"].strip().lower() not in away][:n]


def run_dir(work: str, arm: str, seed: int) -> str:
    return os.path.join(work, "runs", f"{arm}_s{seed}")


def evaluate_splits(model, tokenizer, work_dir: str) -> dict:
    """Task and knowledge NLL on the final test split (the top-level keys) and on the validation split."""
    from trl_recipes.data import FINAL_TEST_FILE, KNOWLEDGE_FINAL_FILE, TEST_FILE
    from trl_recipes.dataset import prompt_and_reference
    from trl_recipes.evaluate import KNOWLEDGE_INSTRUCTION, answer_nll

    def nlls(task_file, knowledge_file):
        task = [prompt_and_reference(r) for r in read_jsonl(task_file)]
        know = read_jsonl(knowledge_file)
        prompts = [[{"role": "user", "content": KNOWLEDGE_INSTRUCTION.format(question=r["question"])}] for r in know]
        return {"task_nll": statistics.mean(answer_nll(model, tokenizer, [p for p, _ in task], [a for _, a in task])),
                "knowledge_nll": statistics.mean(answer_nll(model, tokenizer, prompts, [r["answer"][0] for r in know]))}

    return {**nlls(FINAL_TEST_FILE, KNOWLEDGE_FINAL_FILE),
            "validation": nlls(TEST_FILE, os.path.join(work_dir, "knowledge.jsonl"))}


def job_worker(args) -> None:
    """`--job base` or `--job ARM,SEED`: train the run unless it finished before, then evaluate it."""
    import torch

    from trl_recipes.evaluate import load_for_eval

    out = None
    if args.job != "base":
        arm, seed = args.job.rsplit(",", 1)
        recipe, flags = parse_arms(args.arms)[arm]
        out = run_dir(args.work_dir, arm, int(seed))
        if not os.path.isfile(os.path.join(out, "metrics.json")):
            from trl_recipes.sft import run

            run(["--config", os.path.join(SMOL, recipe), "--seed", seed, "--output_dir", out, *flags,
                 *(["--model_name_or_path", args.model] if args.model else [])])
    result_file = os.path.join(out or args.work_dir, RESULT_FILE)
    if os.path.isfile(result_file):
        return
    adapter = None if out is None else os.path.join(out, "adapter")
    models = load_for_eval(args.model or "SmolLM2-135M-Instruct", adapter=adapter)
    model, tokenizer = (models.after if models.after is not None else models.before), models.tokenizer
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    torch.manual_seed(0)
    result = evaluate_splits(model, tokenizer, args.work_dir)
    with open(result_file + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(result_file + ".tmp", result_file)


def recipe_digest(recipe: str) -> str:
    """The recipe file's contents, as a short sha256: a report records it, and `--reuse` matches on it."""
    with open(os.path.join(SMOL, recipe), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def reused_results(old: dict, arms: dict, args) -> dict:
    """{job: result} from an earlier report's JSON (`old`, read from `args.reuse`): "base", and "ARM,SEED" for each
    arm here whose recipe and flags equal one of that report's arms, at the seeds both cover, and whose recipe file
    still has the contents that report recorded (a report from before `recipe_digest` recorded none, so only its base
    evaluation is reused: a recipe may have changed since). Refused when its knowledge set differs."""
    mine = {k: old["args"].get(k) for k in ("knowledge_examples", "model")}
    if mine != {"knowledge_examples": args.knowledge_examples, "model": args.model}:
        sys.exit(f"error: --reuse {args.reuse}: its runs used {mine}; this invocation uses knowledge_examples="
                 f"{args.knowledge_examples}, model={args.model}. Give the same, or leave --reuse out.")
    if "validation" not in old["base"]:
        sys.exit(f"error: --reuse {args.reuse}: its runs were evaluated on one split only (before 2026-12-07); this "
                 "benchmark evaluates each run on a validation and a final test split. Leave --reuse out.")
    spec_of = {(recipe, tuple(flags)): name for name, (recipe, flags) in old["arms"].items()}
    digests = old.get("recipes", {})
    done = {"base": old["base"]}
    for name, (recipe, flags) in arms.items():
        was = spec_of.get((recipe, tuple(flags)))
        if was not in digests or digests[was] != recipe_digest(recipe):
            continue  # the recipe changed since, or that report cannot tell: run again
        runs = old["results"].get(was, [])
        done.update({f"{name},{42 + i}": run for i, run in enumerate(runs[:args.seeds])})
    return done


def run_job(args, slots: Slots, name: str) -> dict:
    out = None
    if name != "base":
        arm, seed = name.rsplit(",", 1)
        out = run_dir(args.work_dir, arm, int(seed))
    result_file = os.path.join(out or args.work_dir, RESULT_FILE)
    if not os.path.isfile(result_file):
        run_in_slot(["benchmarks.recipe_forgetting", "--job", name, "--work_dir", args.work_dir, "--arms", args.arms,
                     *(["--model", args.model] if args.model else [])], slots, args.workers, name)
    result = json.load(open(result_file))
    if out is not None:
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        result.update(em_before=metrics["held_out_exact_match_before"], em_after=metrics["held_out_exact_match_after"],
                      final_loss=metrics["final_loss"], seconds_per_step=metrics["seconds_per_step"],
                      init_factor_norms=metrics.get("init_factor_norms"),
                      trainable_parameters=metrics.get("trainable_parameters"))
    return result


def claim(kpm: list[dict], lora: list[dict], base: dict, names=("KPM", "LoRA")) -> tuple[str, str, str]:
    """compare_methods' KPM rule (`benchmarks.verdicts.kpm_claim`) on these runs: (claim, verdict, evidence)."""
    return kpm_claim(names[0], gain_and_forgetting(kpm, base), gain_and_forgetting(lora, base), names[1],
                     task="task NLL", knowledge="gold NLL")


def reuse_text(args, reused: list[str]) -> str:
    """The report's line on the runs taken from `--reuse`'s report, empty when none were."""
    if not reused:
        return ""
    runs = [j for j in reused if j != "base"]
    return (f"Reused from {os.path.relpath(args.reuse, ROOT)} (same recipe, flags and seed, evaluated on the same "
            f"questions, the same recipe contents)"
            f"{' with its base evaluation' if 'base' in reused else ''}: {len(runs)} runs, "
            + ", ".join(runs) + ". Every other run trained and was evaluated in this invocation.")


def on_split(item, split: str):
    """A run, a list of runs, {arm: runs} or the base evaluation, seen on `split`: "final" (the top-level numbers)
    or "validation"."""
    if isinstance(item, dict) and "task_nll" not in item:
        return {k: on_split(v, split) for k, v in item.items()}
    if isinstance(item, list):
        return [on_split(r, split) for r in item]
    return item if split == "final" else {**item, **item["validation"]}


def rate_choices(arms: dict, results: dict, base: dict) -> list[list]:
    """On the validation split: every arm that is a non-LoRA arm with `--learning_rate X` added at the end of its
    flags (the same recipe, nothing else changed) against that arm, at the recipe's own rate. The candidate rate is
    adopted when its task NLL is comparable (`comparable_gain`: at most 1.25x the shipped rate's) and it forgets less
    by the 2-standard-error rule, paired by seed; else the shipped rate stays. Rows: [candidate, shipped arm, task
    NLL ratio, comparable, forgetting of each, paired difference, decision] (the plan of b6a814a)."""
    shipped = {(recipe, tuple(flags)): name for name, (recipe, flags) in arms.items()
               if not name.startswith("LoRA") and not any(w.startswith("--learning_rate") for w in flags)}
    rows = []
    for name, (recipe, flags) in arms.items():
        ref = shipped.get((recipe, tuple(flags[:-2])))
        if ref is None or flags[-2:-1] != ["--learning_rate"]:
            continue
        cand, ship = (gain_and_forgetting(results[a], base) for a in (name, ref))
        ok, ratio = comparable_gain(cand["task_nll"], ship["task_nll"])
        diff = paired(cand["forget"], ship["forget"])
        less = diff[0] + 2 * diff[1] < 0
        rows.append([name, ref, f"{ratio:.2f}×", "yes" if ok else "no", fmt(mean_std(cand["forget"])),
                     fmt(mean_std(ship["forget"])), f"{diff[0]:+.3f} ± {diff[1]:.3f}",
                     f"**adopt {flags[-1]}**" if ok and less else f"keep {ref}'s rate"])
    return rows


def _without(flags: list[str], flag: str) -> tuple[list[str], str | None]:
    """`flags` without `flag VALUE`, and VALUE (None when absent)."""
    if flag not in flags[:-1]:
        return flags, None
    i = flags.index(flag)
    return flags[:i] + flags[i + 2:], flags[i + 1]


def budget_rows(arms: dict, results: dict, base: dict) -> list[list]:
    """Budgeted ranks against uniform (the plan of 4a7e371), on the final split: each arm with `--rank_allocation
    budgeted` against the arm with the same recipe and flags without it, and (DuDe, IPM) against every EVA arm
    (`--peft_method eva`). DuDe and IPM: a lower task NLL (paired, 2 s.e.); KPM: forgets no more at comparable gain.
    Rows: [claim, verdict, evidence]."""
    plain = {(recipe, tuple(flags)): name for name, (recipe, flags) in arms.items()}
    evas = [name for name, (_, flags) in arms.items() if _without(flags, "--peft_method")[1] == "eva"]
    rows = []
    for name, (recipe, flags) in arms.items():
        rest, allocation = _without(flags, "--rank_allocation")
        ref = plain.get((recipe, tuple(rest)))
        if allocation != "budgeted" or ref is None:
            continue
        mine = gain_and_forgetting(results[name], base)
        if "kpm" in recipe:
            theirs = gain_and_forgetting(results[ref], base)
            ok, ratio = comparable_gain(mine["task_nll"], theirs["task_nll"])
            diff = paired(mine["forget"], theirs["forget"])
            verdict = ("not at comparable task gain" if not ok else
                       "holds" if diff[0] - 2 * diff[1] <= 0 else "does not hold")
            rows.append([f"{name} forgets no more than {ref} at comparable gain", f"**{verdict}**",
                         f"knowledge change {fmt(mean_std(mine['forget']))} vs {fmt(mean_std(theirs['forget']))} "
                         f"(paired {diff[0]:+.3f} ± {diff[1]:.3f}); task NLL {ratio:.2f}× {ref}'s"])
            continue
        for other in [ref, *evas]:
            theirs = gain_and_forgetting(results[other], base)
            diff = paired(mine["task_nll"], theirs["task_nll"])
            rows.append([f"{name} reaches a lower task NLL than {other}", f"**{sign_verdict(diff)}**",
                         f"task NLL {fmt(mean_std(mine['task_nll']))} vs {fmt(mean_std(theirs['task_nll']))} "
                         f"(paired {diff[0]:+.4f} ± {diff[1]:.4f})"])
    return rows


def results_table(arms: dict, results: dict, base: dict, final: bool) -> str:
    """Mean ± std over seeds of each arm on one split (the final split also shows the run's own numbers)."""
    lora = results.get("LoRA")
    rows = []
    for name, runs in results.items():
        get = lambda k: mean_std([r[k] for r in runs])  # noqa: E731
        row = [name, " ".join([arms[name][0], *arms[name][1]]), fmt(get("task_nll")),
               f"{comparable_gain([r['task_nll'] for r in runs], [r['task_nll'] for r in lora])[1]:.2f}×"
               if lora else "–", fmt(mean_std([r["knowledge_nll"] - base["knowledge_nll"] for r in runs]))]
        if final:
            row += [fmt(mean_std([r["em_after"] for r in runs]), 2),
                    "–" if any(r["final_loss"] is None for r in runs) else fmt(get("final_loss")),
                    f"{statistics.median(r['seconds_per_step'] for r in runs):.1f}",
                    "–" if any(r.get("trainable_parameters") is None for r in runs)
                    else f"{statistics.median(r['trainable_parameters'] for r in runs) / 1e6:.3f} M"]
        rows.append(row)
    head = ["arm", "recipe", "task answer NLL ↓", "× LoRA's", "knowledge gold NLL change ↓ (forgetting)"]
    return markdown_table(head + (["exact match (20, validation) ↑", "final train loss", "s/step (median)",
                                   "trainable parameters"] if final else []), rows)


def plane_text(arms: dict, results: dict, base: dict, out: str) -> list[str]:
    """On the final split: each arm against LoRA's recipe at comparable gain, and at equal gain along LoRA's rates."""
    parts = []
    rows = [[c, f"**{v}**", e] for k in results if not k.startswith("LoRA") and "LoRA" in results
            for c, v, e in [claim(results[k], results["LoRA"], base, (k, "LoRA"))]]
    if rows:
        parts.append("## Each recipe against LoRA's recipe (final test split)\n\n"
                     + markdown_table(["claim", "verdict", "evidence"], rows))
    complete = along_rates(arms, results)
    equal_gain = equal_gain_rows(complete, base, arms=lambda m: True)  # every arm against LoRA at its task gain
    n_lora = lora_rates(complete)
    parts += filter(None, [equal_gain_text(equal_gain, n_lora)])
    if n_lora > 1:
        tradeoff_figure(complete, base, out + "_tradeoff.png")
        parts.append(f"Plot (final test split): [each arm along its rates]({os.path.basename(out)}_tradeoff.png).")
    return parts, equal_gain


def report(args, arms, base, results, wall_minutes, reuse_line="") -> None:
    seeds = [42 + i for i in range(args.seeds)]
    val, val_base = on_split(results, "validation"), on_split(base, "validation")
    per_seed = [[name, *[f"{r['knowledge_nll'] - base['knowledge_nll']:+.3f}" for r in runs]]
                for name, runs in results.items()]
    parts = [
        "# Forgetting with the shipped CPU recipes (SmolLM2-135M-Instruct, 60 steps on the shipped arithmetic data)",
        f"Command: `python -m benchmarks.recipe_forgetting --arms \"{args.arms}\" --seeds {args.seeds} "
        f"--knowledge_examples {args.knowledge_examples} --workers {args.workers}"
        + (f" --model {args.model}" if args.model else "")
        + (f" --reuse {os.path.relpath(args.reuse, ROOT)}" if args.reuse else "") + f"`  \nMachine: {machine()}; "
        f"{args.workers} runs at a time  \nDate: {stamp()}; wall time of this invocation {wall_minutes:.0f} min",
        f"Each arm is a shipped recipe run unchanged but for `--seed` (seeds {seeds}) and the flags it names. Each "
        "adapter is evaluated on two splits, each with a task (answer NLL over 60 held-out arithmetic problems) and "
        "knowledge (NQ-open gold-answer NLL on EfficientQA-dev questions that are not in NQ-open dev, the KPM recipe's "
        f"calibration file). **Validation**: trl_recipes/data/test.jsonl and {args.knowledge_examples} questions "
        "(efficientqa_knowledge_eval.jsonl), where the recipes' rates were chosen and where the rate choices below "
        "are made. **Final test**: test_final.jsonl and efficientqa_knowledge_final.jsonl (200), on which nothing was "
        f"chosen: every result and verdict below is on it unless it says otherwise. Base model, final split: task NLL "
        f"{base['task_nll']:.3f}, knowledge {base['knowledge_nll']:.3f}; validation: {val_base['task_nll']:.3f}, "
        f"{val_base['knowledge_nll']:.3f}.",
        *filter(None, [reuse_line]),
        "## Results on the final test split (mean ± std over seeds)\n\n" + results_table(arms, results, base, True),
        "Knowledge gold NLL change per seed (final test split):\n\n"
        + markdown_table(["arm", *[f"seed {s}" for s in seeds]], per_seed),
        "## Validation split\n\n" + results_table(arms, val, val_base, False),
    ]
    choices = rate_choices(arms, val, val_base)
    if choices:
        parts.append("### Rate choices (validation split)\n\n" + markdown_table(
            ["candidate", "shipped", "task NLL × shipped", "comparable (≤ 1.25×)", "its forgetting",
             "shipped forgetting", "paired difference ± s.e.", "decision"], choices))
    plane, equal_gain = plane_text(arms, results, base, args.out)
    parts += plane
    budgets = budget_rows(arms, results, base)
    if budgets:
        parts.append("## Budgeted ranks (final test split)\n\n" + markdown_table(["claim", "verdict", "evidence"], budgets))
    write_report(args.out + ".md", "\n\n".join(parts), {"base": base, "results": results, "arms": arms,
                                                       "recipes": {a: recipe_digest(r) for a, (r, _) in arms.items()},
                                                       "equal_gain": equal_gain, "rate_choices": choices,
                                                       "args": {k: v for k, v in vars(args).items() if k != "job"}})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=DEFAULT_ARMS)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 42, 43, ... (42 is the recipes' own)")
    ap.add_argument("--knowledge_examples", type=int, default=200)
    add_data_dir_argument(ap)  # only for --knowledge_examples above the packaged slice's 200
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "recipe_forgetting"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default=None, help="base model (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "recipe_forgetting", "recipe_forgetting"))
    ap.add_argument("--reuse", default=None, help="an earlier report's JSON whose matching runs are not run again")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.job:
        return job_worker(args)
    arms = parse_arms(args.arms)
    along_rates(arms, dict.fromkeys(arms, []))  # every arm's rate read, no two LoRA arms at one rate: before any work
    old = None
    if args.reuse:
        with open(args.reuse) as f:
            old = json.load(f)
    reused = reused_results(old, arms, args) if old else {}  # a report of other questions refused: before any work
    os.makedirs(os.path.join(args.work_dir, "runs"), exist_ok=True)
    write_jsonl(os.path.join(args.work_dir, "knowledge.jsonl"), knowledge_records(args.data_dir, args.knowledge_examples))
    slots, t0 = Slots(args.workers), time.time()
    jobs = [j for j in ["base", *[f"{a},{42 + i}" for i in range(args.seeds) for a in arms]] if j not in reused]
    try:
        done = {**reused, **dict(zip(jobs, parallel(lambda j: run_job(args, slots, j), jobs)))}
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    results = {a: [done[f"{a},{42 + i}"] for i in range(args.seeds)] for a in arms}
    report(args, arms, done["base"], results, (time.time() - t0) / 60,
           reuse_text(args, sorted(reused)))


if __name__ == "__main__":
    main()
