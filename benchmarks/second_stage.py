"""Does CorDA-KPM's knowledge retention survive a second stage? DPO and GRPO after SFT, for LoRA, DuDe and CorDA-KPM.

Each arm's SFT adapter is its shipped recipe at a seed (reused from `benchmarks.recipe_forgetting`'s work folder when
that run exists there, trained here otherwise); each is then continued with the shipped second-stage recipes
(`trl_recipes.dpo`, `trl_recipes.grpo`) at the same seed, at a tenth of its SFT recipe's rate (the rule the stage
recipes state, fixed before any run). Every stage run is evaluated by the stage script itself, before (the SFT model)
and after, on the final test split (test_final.jsonl and efficientqa_knowledge_final.jsonl, on which nothing was
chosen): task answer NLL, knowledge gold-answer NLL, and the stage's own metric (held-out preference accuracy and
reward margin; mean reward of greedy answers to held-out prompts). The base model is evaluated once on the same
split.

    python -m benchmarks.second_stage                 # 3 arms x 2 stages x 3 seeds (18 stage runs; SFT runs reused)
    python -m benchmarks.second_stage --stages dpo --arms LoRA,CorDA-KPM --seeds 2

Decision rule (plan commit, before any run): per stage, KPM's retention survives iff, after the stage, KPM's
knowledge change from the base model is lower than LoRA's by more than twice the standard error of the paired
per-seed difference (`verdicts.sign_verdict`). Also reported, with the same rule: the knowledge change the stage
itself adds (after − SFT) for KPM against LoRA, and each arm's stage metric against LoRA's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from benchmarks.common import (ROOT, SMOL, Slots, fmt, machine, markdown_table, mean_std, paired, parallel,
                               run_in_slot, stamp, write_report)
from benchmarks.verdicts import sign_verdict

# arm -> (SFT recipe, its rate): the stage rate is a tenth of it
ARMS = {"LoRA": ("lora/config_cpu.yaml", 5e-4), "DuDe": ("dude/config_cpu.yaml", 2e-4),
        "CorDA-KPM": ("corda/config_kpm_cpu.yaml", 1.6e-3)}
STAGES = ("dpo", "grpo")
STAGE_METRIC = {"dpo": ("preference", "preference_accuracy", "held-out preference accuracy ↑"),
                "grpo": ("reward", "mean_reward", "held-out mean reward ↑")}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"a subset of {', '.join(ARMS)}")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 42, 43, ... (42 is the recipes' own)")
    ap.add_argument("--sft_runs", default=os.path.join(ROOT, "outputs", "recipe_forgetting", "runs"),
                    help="where finished SFT runs ARM_sSEED/ are reused from (benchmarks.recipe_forgetting's)")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "second_stage"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default=None, help="base model (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--sft_flags", default="", help="extra flags for SFT runs trained here (tests: fewer steps)")
    ap.add_argument("--knowledge_examples", type=int, default=200, help="knowledge questions of the final split")
    ap.add_argument("--stage_flags", default="", help="extra flags for every stage run (tests: fewer steps)")
    ap.add_argument("--grpo_flags", default="", help="extra flags for the GRPO runs only")
    ap.add_argument("--base_flags", default="", help="extra flags for the base model's evaluation")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "second_stage", "second_stage"))
    return ap


def sft_dir(args, arm: str, seed: int) -> str:
    """The SFT run of `arm` at `seed`: the reusable one if it finished, else this benchmark's own."""
    reused = os.path.join(args.sft_runs, f"{arm}_s{seed}")
    if os.path.isfile(os.path.join(reused, "metrics.json")) and not args.sft_flags:
        return reused
    return os.path.join(args.work_dir, "sft", f"{arm}_s{seed}")


def sft_job(args, slots, arm: str, seed: int) -> str:
    out = sft_dir(args, arm, seed)
    if not os.path.isfile(os.path.join(out, "metrics.json")):
        run_in_slot(["trl_recipes.sft", "--config", os.path.join(SMOL, ARMS[arm][0]), "--seed", str(seed),
                     "--output_dir", out, *(["--model_name_or_path", args.model] if args.model else []),
                     *shlex.split(args.sft_flags)], slots, args.workers, f"SFT {arm},{seed}")
    return out


def stage_job(args, slots, stage: str, arm: str, seed: int) -> dict:
    from trl_recipes.data import FINAL_TEST_FILE, KNOWLEDGE_FINAL_FILE

    out = os.path.join(args.work_dir, stage, f"{arm}_s{seed}")
    if not os.path.isfile(os.path.join(out, "metrics.json")):
        run_in_slot([f"trl_recipes.{stage}", "--sft_adapter", sft_dir(args, arm, seed), "--seed", str(seed),
                     "--learning_rate", f"{ARMS[arm][1] / 10:g}", "--output_dir", out, "--task_eval_data",
                     FINAL_TEST_FILE, "--knowledge_eval_data", KNOWLEDGE_FINAL_FILE, "--num_knowledge",
                     str(args.knowledge_examples), *(["--model_name_or_path", args.model] if args.model else []),
                     *shlex.split(args.stage_flags), *shlex.split(args.grpo_flags if stage == "grpo" else "")],
                    slots, args.workers, f"{stage} {arm},{seed}")
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def base_job(args, slots) -> dict:
    """The base model on the final split (trl_recipes.evaluate, without an adapter)."""
    from trl_recipes.data import FINAL_TEST_FILE, KNOWLEDGE_FINAL_FILE

    out = os.path.join(args.work_dir, "base")
    if not os.path.isfile(os.path.join(out, "eval.json")):
        run_in_slot(["trl_recipes.evaluate", "--task_data", FINAL_TEST_FILE, "--knowledge_data",
                     KNOWLEDGE_FINAL_FILE, "--num_knowledge", str(args.knowledge_examples), "--output_dir", out,
                     *(["--model", args.model] if args.model else []), *shlex.split(args.base_flags)],
                    slots, args.workers, "base")
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)["before"]


# --- the report ---------------------------------------------------------------------------------------------------


def per_seed(runs: list[dict], base: dict) -> dict:
    """Per seed: the stage's knowledge and task numbers, from the stage run's own before (SFT) and after."""
    return {"know_sft": [r["before"]["knowledge"]["gold_nll"] - base["knowledge"]["gold_nll"] for r in runs],
            "know_after": [r["after"]["knowledge"]["gold_nll"] - base["knowledge"]["gold_nll"] for r in runs],
            "know_added": [r["after"]["knowledge"]["gold_nll"] - r["before"]["knowledge"]["gold_nll"] for r in runs],
            "task_sft": [r["before"]["task"]["answer_nll"] for r in runs],
            "task_after": [r["after"]["task"]["answer_nll"] for r in runs]}


def metric(runs: list[dict], stage: str, side: str) -> list[float]:
    part, key, _ = STAGE_METRIC[stage]
    return [r[side][part][key] for r in runs]


def summary_table(stage: str, results: dict, base: dict) -> str:
    rows = []
    for arm, runs in results.items():
        s = per_seed(runs, base)
        extra = (fmt(mean_std([r["after"]["preference"]["reward_margin"] for r in runs])) if stage == "dpo" else
                 fmt(mean_std([r["after"]["reward"]["correct"] for r in runs]), 2))
        rows.append([arm, f"{fmt(mean_std(metric(runs, stage, 'before')), 2)} → "
                          f"{fmt(mean_std(metric(runs, stage, 'after')), 2)}", extra,
                     f"{fmt(mean_std(s['task_sft']))} → {fmt(mean_std(s['task_after']))}",
                     f"{fmt(mean_std(s['know_sft']))} → {fmt(mean_std(s['know_after']))}",
                     fmt(mean_std(s["know_added"]))])
    head = ["arm", f"{STAGE_METRIC[stage][2]}, SFT → {stage}",
            "reward margin after" if stage == "dpo" else "correct after", "task answer NLL, SFT → after",
            "knowledge change from base, SFT → after", f"knowledge change {stage} adds"]
    return markdown_table(head, rows)


def verdict_rows(stage: str, results: dict, base: dict) -> list[list]:
    """The plan's rule: KPM against LoRA after the stage (paired by seed, 2 s.e.), then what the stage adds, then
    each arm's stage metric against LoRA's (higher is better: the difference is taken LoRA − arm)."""
    rows = []
    if {"CorDA-KPM", "LoRA"} <= set(results):
        kpm, lora = per_seed(results["CorDA-KPM"], base), per_seed(results["LoRA"], base)
        for key, what in (("know_after", f"after {stage}"), ("know_added", f"added by {stage}")):
            d = paired(kpm[key], lora[key])
            rows.append([f"CorDA-KPM's knowledge change {what} is lower than LoRA's", f"**{sign_verdict(d)}**",
                         f"{fmt(mean_std(kpm[key]))} vs {fmt(mean_std(lora[key]))} (paired {d[0]:+.3f} ± "
                         f"{d[1]:.3f})"])
    for arm in (a for a in results if a != "LoRA" and "LoRA" in results):
        d = paired(metric(results["LoRA"], stage, "after"), metric(results[arm], stage, "after"))
        rows.append([f"{arm}'s {STAGE_METRIC[stage][2].rstrip(' ↑')} after {stage} is higher than LoRA's",
                     f"**{sign_verdict(d)}**", f"paired (LoRA − {arm}) {d[0]:+.3f} ± {d[1]:.3f}"])
    return rows


def report(args, results: dict, base: dict, minutes: float) -> None:
    seeds = [42 + i for i in range(args.seeds)]
    parts = [
        "# A second stage after SFT: DPO and GRPO for LoRA, DuDe and CorDA-KPM (SmolLM2-135M-Instruct)",
        f"Command: `python -m benchmarks.second_stage --arms {args.arms} --stages {args.stages} --seeds {args.seeds} "
        f"--workers {args.workers}" + (f" --model {args.model}" if args.model else "")
        + "".join(f" --{k} \"{getattr(args, k)}\"" for k in ("sft_flags", "stage_flags", "grpo_flags", "base_flags")
                  if getattr(args, k))
        + f"`  \nMachine: {machine()}; {args.workers} runs at a time  \nDate: {stamp()}; wall time of this "
        f"invocation {minutes:.0f} min",
        f"Each arm's SFT adapter (its shipped recipe, seeds {seeds}) continued by the shipped stage recipe at the same "
        "seed, at a tenth of the SFT rate. Every number on the final test split: task answer NLL (60 problems), "
        f"knowledge gold-answer NLL ({args.knowledge_examples} EfficientQA questions), and the stage's own held-out "
        "metric. Base model: "
        f"task NLL {base['task']['answer_nll']:.3f}, knowledge {base['knowledge']['gold_nll']:.3f}. Mean ± std over "
        "seeds; verdicts by the plan's rule (paired by seed, 2 standard errors).",
    ]
    for stage, by_arm in results.items():
        parts += [f"## {stage.upper()}", summary_table(stage, by_arm, base),
                  markdown_table(["claim", "verdict", "evidence"], verdict_rows(stage, by_arm, base))]
    write_report(args.out + ".md", "\n\n".join(parts),
                 {"args": vars(args), "base": base, "results": results, "machine": machine(), "date": stamp()})


def main() -> None:
    args = build_parser().parse_args()
    arms, stages = args.arms.split(","), args.stages.split(",")
    bad = [a for a in arms if a not in ARMS] + [s for s in stages if s not in STAGES]
    if bad or args.seeds < 1:
        sys.exit(f"error: unknown arms or stages {bad} (arms: {', '.join(ARMS)}; stages: {', '.join(STAGES)}), or "
                 f"--seeds {args.seeds} < 1.")
    slots, t0, seeds = Slots(args.workers), time.time(), [42 + i for i in range(args.seeds)]
    try:
        parallel(lambda j: sft_job(args, slots, *j), [(a, s) for s in seeds for a in arms])
        jobs = [(st, a, s) for st in stages for s in seeds for a in arms]
        base, *done = parallel(lambda j: base_job(args, slots) if j is None else stage_job(args, slots, *j),
                               [None, *jobs])
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    results = {st: {a: [r for (st2, a2, _), r in zip(jobs, done) if (st2, a2) == (st, a)] for a in arms}
               for st in stages}
    report(args, results, base, (time.time() - t0) / 60)


if __name__ == "__main__":
    main()
